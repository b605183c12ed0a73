"""The shared sidebar: which collection, which device, which trained LoL model. app.py draws it once per rerun,
before the page (so its widgets keep their values across page switches); every page starts with
``ctx = context()``.

Collections come from three places: the shipped defaults under ``DATA/collections``; a folder of LoRA files or a
packed collection on the server (`lol.uploads.resolve_server_path`: off unless the operator allows it); or LoRA files
uploaded in the browser (`lol.uploads.read_uploads`, then `pack_uploads`). A collection that cannot be opened is one
plain line (``ctx.problem``); the app keeps working.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from . import cache
from .glossary import kind_help
from ..catalog import CheckpointInfo, checkpoints
from ..devices import devices
from ..errors import LoLError, one_line
from ..paths import data_root, shipped_collections
from .. import uploads

__all__ = ["AppContext", "render", "context", "collection_caption", "max_upload_mb", "open_shipped_button"]

_SERVER = "A folder or packed collection on the server…"
_UPLOAD = "Uploaded LoRA files…"
_CTX = "_lol_context"  # the AppContext of the current rerun, for the page


@dataclass
class AppContext:
    """What the sidebar chose, for the pages."""

    source: str | None = None            # shown name of the collection
    path: str | None = None              # its folder
    key: str | None = None               # cache key (changes when files change)
    kind: str = "none"                   # "shipped" | "server" | "upload" | "none"
    collection: object | None = None     # lol.collection.Collection
    problem: str | None = None           # why there is no collection, in one line
    device: str = "cpu"
    model: CheckpointInfo | None = None  # the chosen trained LoL model (on screen: its ``title``)
    models: list[CheckpointInfo] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.collection is not None

    def table(self):
        return cache.collection_table(self.path, self.key)

    def require_collection(self) -> bool:
        """Show why there is no collection (once, as st.info) and return False; True when one is open."""
        if self.collection is not None:
            return True
        st.info(self.problem or "Choose a collection in the sidebar.")
        return False

    def fitting(self) -> list[CheckpointInfo]:
        """The models whose modules are the collection's and which predict a label its table has (for uploaded or
        server files, labels are not needed)."""
        cols = set(self.collection.table.columns) if self.ok else set()
        return [m for m in self.models if self.ok and m.fits(self.collection.spec)
                and (not m.labels or set(m.labels) & cols or self.kind in ("upload", "server"))]

    def model_for(self, label: str) -> CheckpointInfo | None:
        """The model a view of one label uses: the sidebar's when it predicts ``label``, else the fitting checkpoint
        the index ships for it, else the first fitting one that predicts it; None when none does."""
        fitting = self.fitting()
        if self.model is not None and label in self.model.labels and self.model in fitting:
            return self.model
        have = [m for m in fitting if label in m.labels]
        return next((m for m in have if label in m.shipped_for), have[0] if have else None)

    def predictions(self, model: CheckpointInfo | None = None):
        """`lol.predict.CollectionPredictions` of ``model`` (default: the sidebar's) for the collection, cached; None
        without a fitting model. A library error goes to the page's error boundary."""
        model = model or self.model
        if model is None or model not in self.fitting():
            return None
        return cache.predictions(model.path, self.device, self.path, self.key)


def render() -> AppContext:
    """Draw the sidebar and return the choice (also `context` for the page). Expected problems (a collection that
    cannot be opened, bad uploads) become ``ctx.problem`` or a message; anything else is a bug and propagates to the
    page's error boundary."""
    url = _from_url()  # a prepared view: ?collection=lm&model=lm/membership&lora=lm-00012 on the first run
    ctx, sb = AppContext(), st.sidebar
    sb.markdown("### Collection")
    shipped = shipped_collections()
    roots = uploads.server_roots()
    options = [f"{n} (shipped)" for n in shipped] + ([_SERVER] if roots else []) + [_UPLOAD]
    if url.get("collection") and f"{url['collection']} (shipped)" in options:
        st.session_state["collection_choice"] = f"{url['collection']} (shipped)"
    if st.session_state.get("collection_choice") not in options:  # e.g. server folders were switched off
        st.session_state.pop("collection_choice", None)
    choice = sb.selectbox("Collection", options, key="collection_choice", label_visibility="collapsed",
                          help="Shipped defaults live under data/collections (built by `lol zoo build`).")
    if not shipped:
        sb.caption(f"No shipped collections under `{data_root() / 'collections'}` yet: build them with "
                   f"`lol zoo build`, or choose a folder or upload files.")
    if choice == _SERVER:
        _server_folder(ctx, sb, roots)
    elif choice == _UPLOAD:
        _uploads(ctx, sb)
    else:
        name = choice.removesuffix(" (shipped)")
        _open(ctx, shipped[name], kind="shipped", name=name)
    if ctx.ok:
        sb.caption(collection_caption(ctx, named=False))

    sb.markdown("### Device")
    found = devices()
    ctx.device = sb.selectbox("Device", found, key="device", label_visibility="collapsed",
                              help="cuda when a GPU is visible to the server, else cpu.")
    if "cuda" not in found:
        sb.caption("No GPU visible: models and image generation run on the CPU.")

    sb.markdown("### LoL model")
    try:
        ctx.models = checkpoints()
    except (OSError, ValueError) as e:  # a malformed checkpoint index: one line, no models
        sb.warning(one_line(e))
    fitting = ctx.fitting() if ctx.ok else ctx.models
    if fitting:
        names = [m.title for m in fitting]
        wanted = [m.title for m in fitting if m.name == url.get("model")]
        if wanted or st.session_state.get("model_choice") not in names:
            st.session_state["model_choice"] = (wanted or names)[0]
        pick = sb.selectbox("LoL model", names, key="model_choice", label_visibility="collapsed",
                            help="Trained checkpoints whose modules and labels fit the chosen collection: "
                                 "checkpoint — what it predicts · model family.")
        ctx.model = fitting[names.index(pick)]
        sb.caption(kind_help(ctx.model.kind))
    elif ctx.models:
        sb.caption("None of the trained checkpoints fits this collection (other modules or labels).")
    else:
        sb.caption(f"No trained checkpoints under `{data_root() / 'checkpoints'}` yet "
                   f"(train them with `lol train` or the notebooks).")
    _to_url(ctx)
    st.session_state[_CTX] = ctx
    return ctx


def open_shipped_button(name: str, why: str = "", where=None) -> None:
    """A button that makes the shipped collection ``name`` the sidebar's choice: its callback sets the sidebar's
    selectbox before the rerun it triggers (a widget's value cannot change after it is drawn in a run)."""
    def choose():
        st.session_state["collection_choice"] = f"{name} (shipped)"

    (where or st).button(f"Open the {name} collection" + (f" ({why})" if why else ""), key=f"open_shipped_{name}",
                         on_click=choose, icon=":material/swap_horiz:")


def context() -> AppContext:
    """The sidebar's choice for this rerun (app.py draws the sidebar before it runs the page)."""
    return st.session_state[_CTX]


def collection_caption(ctx: AppContext, named: bool = True) -> str:
    """``**lm** · 400 LoRAs · 8 adapted modules · base model: `base/lm` `` (without the name in the sidebar)."""
    from ..paths import describe_base

    c = ctx.collection
    base = describe_base(getattr(c, "base_model", None))
    bits = [f"**{ctx.source}**"] * named + [f"{len(c)} LoRAs", f"{len(c.spec)} adapted modules"]
    return " · ".join(bits + ([f"base model: `{base}`"] if base else []))


def _from_url() -> dict:
    """The query parameters of the page's address, read once per browser session (later choices win)."""
    if st.session_state.get("_lol_url_read"):
        return {}
    st.session_state["_lol_url_read"] = True
    q = {k: st.query_params.get(k) for k in ("collection", "model", "lora")}
    if q.get("lora"):
        from .nav import set_chosen

        set_chosen(q["lora"])
    return {k: v for k, v in q.items() if v}


def _to_url(ctx: AppContext) -> None:
    """Write the current choice into the address bar (collection, model, LoRA; the page is its path), so the view
    can be bookmarked or opened prepared at a talk."""
    from .nav import current_lora

    lora = current_lora()
    want = {"collection": ctx.source if ctx.kind == "shipped" else None,
            "model": ctx.model.name if ctx.model is not None else None,
            "lora": str(lora) if lora and ctx.ok else None}
    for k, v in want.items():
        if v and st.query_params.get(k) != v:
            st.query_params[k] = v
        elif not v and k in st.query_params:
            del st.query_params[k]


def _open(ctx: AppContext, path: Path, kind: str, name: str) -> None:
    """Open a packed collection, or pack a folder / file of loose LoRAs first (notes on skipped files shown)."""
    ctx.source, ctx.kind, ctx.path = name, kind, str(path)
    if not path.exists():
        ctx.problem = f"{path}: no such file or folder on the server."
        return
    try:
        if not (path / "collection.json").is_file():  # loose LoRA files: packed once under the app cache
            packed_path, notes = cache.packed(str(path), cache.path_key(path))
            for n in notes[:20]:
                st.sidebar.warning(n)
            path = Path(packed_path)
            ctx.path = str(path)
        ctx.key = cache.path_key(path)
        coll = cache.collection(str(path), ctx.key)
        if len(coll) == 0:
            ctx.problem = f"{name}: the collection is empty (no LoRAs in {path})."
            return
        ctx.collection = coll
    except (LoLError, OSError, ValueError) as e:  # a bad folder or file: one plain line
        ctx.problem = f"Could not open {name}: {one_line(e)}"


def _server_folder(ctx: AppContext, sb, roots: list[Path]) -> None:
    path = sb.text_input("Path on the server", key="server_path", placeholder=str(roots[0]),
                         help="A packed collection, or a folder of LoRA files (.safetensors or PEFT folders), "
                              "inside " + ", ".join(str(r) for r in roots) + ".")
    if not path.strip():
        ctx.problem = "Enter the path of a packed collection or a folder of LoRA files in the sidebar."
        return
    try:
        _open(ctx, uploads.resolve_server_path(path), kind="server", name=path.strip())
    except uploads.FolderRefused as e:
        ctx.source, ctx.kind, ctx.problem = path.strip(), "server", str(e)


def max_upload_mb() -> int:
    """The largest file the page reads: ``LOL_UPLOAD_MAX_MB``, else streamlit's ``server.maxUploadSize``."""
    return uploads.default_max_mb() if os.environ.get("LOL_UPLOAD_MAX_MB", "").strip().isdigit() else \
        int(st.get_option("server.maxUploadSize"))


def _uploads(ctx: AppContext, sb) -> None:
    """Uploaded files as a collection: read and judged one by one (`lol.uploads.read_uploads`; the staging folder
    is removed at once), then the largest group fitting one base is packed under the app cache
    (`lol.uploads.pack_uploads`); the other files are named with the base they fit."""
    files = sb.file_uploader("LoRA files", type=uploads.ACCEPTED_TYPES, accept_multiple_files=True,
                             key="sidebar_upload", help=uploads.limits_text(max_upload_mb()))
    ctx.kind, ctx.source = "upload", "uploaded files"
    if not files:
        sb.caption(uploads.limits_text(max_upload_mb()))
        ctx.problem = "Upload one or more LoRA files in the sidebar."
        return
    sig = tuple((f.name, f.size, getattr(f, "file_id", "")) for f in files)
    if st.session_state.get("_lol_upload", (None,))[0] != sig:  # read once per set of files, not on every rerun
        res = uploads.read_uploads(files, cache.shipped_bases(), require_base=False, max_mb=max_upload_mb())
        dest = cache.cache_root() / "uploads" / hashlib.sha1(repr(sig).encode()).hexdigest()[:16]
        packed_path, errors, notes = uploads.pack_uploads(res.loras, dest, keep=16)  # older sessions' uploads go
        st.session_state["_lol_upload"] = (sig, packed_path, res.errors + errors, notes)
    _, packed_path, errors, notes = st.session_state["_lol_upload"]
    for e in errors:
        sb.error(e)
    for n in notes:
        sb.warning(n)
    if packed_path is None:
        ctx.problem = "None of the uploaded files could be read as a LoRA (see the messages in the sidebar)."
        return
    _open(ctx, Path(packed_path), kind="upload", name=f"{len(sig)} uploaded file(s)")
