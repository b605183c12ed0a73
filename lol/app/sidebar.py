"""The shared sidebar: which collection, which device, which trained LoL model. Every page starts with
``ctx = render()``; widget keys are shared, so the choice carries over from page to page.

Collections come from three places: the shipped defaults under ``DATA/collections``; a folder of LoRA files or a
packed collection on the server (a path); or LoRA files uploaded in the browser (staged in a temporary folder, then
opened like a folder). Any failure to open one is shown as one plain message; the app keeps working.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import streamlit as st

from . import cache
from . import data as app_data
from ..errors import LoLError
from .errors import plain

__all__ = ["AppContext", "ModelChoice", "render", "context"]

_SERVER = "A folder or packed collection on the server…"
_UPLOAD = "Uploaded LoRA files…"


@dataclass(frozen=True)
class ModelChoice:
    name: str          # shown in the sidebar, e.g. "clip_score · glnet"
    path: str          # checkpoint folder
    label: str | None  # the label it was trained for, when known
    kind: str | None = None  # model kind (lol.models)


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
    model: ModelChoice | None = None
    models: list[ModelChoice] = field(default_factory=list)
    upload_errors: list[str] = field(default_factory=list)

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


def context() -> AppContext:
    """The current sidebar choice (set by `render`, which app.py calls before the page runs)."""
    ctx = st.session_state.get("_lol_ctx")
    return ctx if isinstance(ctx, AppContext) else AppContext(problem="The sidebar has not run yet.")


def render() -> AppContext:
    """Draw the sidebar and return the choice. Expected problems (a collection that cannot be opened, bad uploads)
    become ``ctx.problem`` or a message; anything else is a bug and propagates to the page's error boundary."""
    return _render()


# widget keys whose value must survive page switches (streamlit forgets a page's widget state when the page
# changes; re-assigning the value as plain session state keeps it)
_KEEP = ("collection_choice", "server_path", "device", "model_choice")


def _render() -> AppContext:
    for k in _KEEP:
        if k in st.session_state:
            st.session_state[k] = st.session_state[k]
    url = _from_url()  # a prepared view: ?collection=lm&model=lm/membership&lora=lm-00012 on the first run
    ctx = AppContext()
    sb = st.sidebar
    sb.markdown("### Collection")
    shipped = _shipped()
    from .sources import server_roots

    roots = server_roots()
    options = [f"{n} (shipped)" for n in shipped] + ([_SERVER] if roots else []) + [_UPLOAD]
    if url.get("collection") and f"{url['collection']} (shipped)" in options:
        st.session_state["collection_choice"] = f"{url['collection']} (shipped)"
    if st.session_state.get("collection_choice") not in options:
        st.session_state.pop("collection_choice", None)
    choice = sb.selectbox("Collection", options, key="collection_choice", label_visibility="collapsed",
                          help="Shipped defaults live under data/collections (built by `lol zoo build`).")
    if not shipped:
        sb.caption(f"No shipped collections under `{app_data.data_root() / 'collections'}` yet: build them with "
                   f"`lol zoo build`, or choose a folder or upload files.")
    if choice == _SERVER:
        path = sb.text_input("Path on the server", key="server_path", placeholder=str(roots[0]),
                             help="A packed collection, or a folder of LoRA files (.safetensors or PEFT folders), "
                                  "inside " + ", ".join(str(r) for r in roots) + ".")
        if path.strip():
            from .sources import FolderRefused, resolve_server_path

            try:
                _open(ctx, resolve_server_path(path), kind="server", name=path.strip())
            except FolderRefused as e:
                ctx.source, ctx.kind, ctx.problem = path.strip(), "server", str(e)
        else:
            ctx.problem = "Enter the path of a packed collection or a folder of LoRA files in the sidebar."
    elif choice == _UPLOAD:
        _uploads(ctx, sb)
    else:
        name = choice.removesuffix(" (shipped)")
        _open(ctx, shipped[name], kind="shipped", name=name)
    if ctx.ok:
        from .views import collection_caption

        sb.caption(collection_caption(ctx, named=False))

    sb.markdown("### Device")
    devices = app_data.devices()
    ctx.device = sb.selectbox("Device", devices, key="device", label_visibility="collapsed",
                              help="cuda when a GPU is visible to the server, else cpu.")
    if "cuda" not in devices:
        sb.caption("No GPU visible: models and image generation run on the CPU.")

    sb.markdown("### LoL model")
    ctx.models = _models()
    fitting = ctx.models
    if ctx.ok:
        from .preds import compatible_models

        fitting = compatible_models(ctx, ctx.collection)
    if fitting:
        names = [m.name for m in fitting]
        wanted = [n for n in names if url.get("model") and n.startswith(f"{url['model']} — ")]
        if wanted:
            st.session_state["model_choice"] = wanted[0]
        if st.session_state.get("model_choice") not in names:
            st.session_state["model_choice"] = names[0]
        pick = sb.selectbox("LoL model", names, key="model_choice", label_visibility="collapsed",
                            help="Trained checkpoints whose modules and labels fit the chosen collection: "
                                 "checkpoint — what it predicts · model family.")
        ctx.model = fitting[names.index(pick)]
        from .glossary import kind_help

        sb.caption(kind_help(ctx.model.kind))
    elif ctx.models:
        sb.caption("None of the trained checkpoints fits this collection (other modules or labels).")
    else:
        sb.caption(f"No trained checkpoints under `{app_data.data_root() / 'checkpoints'}` yet "
                   f"(train them with `lol train` or the notebooks).")
    st.session_state["_lol_ctx"] = ctx
    to_url(ctx)
    return ctx


_URL_READ = "_lol_url_read"


def _from_url() -> dict:
    """The query parameters of the page's address, read once per browser session (later choices win)."""
    if st.session_state.get(_URL_READ):
        return {}
    st.session_state[_URL_READ] = True
    q = {k: st.query_params.get(k) for k in ("collection", "model", "lora")}
    if q.get("lora"):
        from .nav import set_chosen

        set_chosen(q["lora"])
    return {k: v for k, v in q.items() if v}


def to_url(ctx: AppContext) -> None:
    """Write the current choice into the address bar (collection, model, LoRA; the page is its path), so the view
    can be bookmarked or opened prepared at a talk."""
    from .nav import current_lora

    want = {}
    if ctx.kind == "shipped" and ctx.source:
        want["collection"] = ctx.source
    if ctx.model is not None:
        want["model"] = ctx.model.name.split(" — ", 1)[0]
    lora = current_lora()
    if lora and ctx.collection is not None:
        want["lora"] = str(lora)
    for k in ("collection", "model", "lora"):
        if k in want and st.query_params.get(k) != want[k]:
            st.query_params[k] = want[k]
        elif k not in want and k in st.query_params:
            del st.query_params[k]


def _shipped() -> dict[str, Path]:
    try:
        return app_data.shipped_collections()
    except OSError:
        return {}


def _models() -> list[ModelChoice]:
    try:
        index = app_data.checkpoint_index()
        dirs = app_data.checkpoint_dirs()
    except (OSError, ValueError) as e:
        st.sidebar.warning(plain(e))
        return []
    by_path = {str(p): label for label, p in index.items()}
    root = app_data.data_root() / "checkpoints"
    out = []
    for d in dirs:
        try:
            rel = str(d.relative_to(root.resolve()))
        except ValueError:
            rel = d.name
        label = by_path.get(str(d))
        from .glossary import model_name
        from .preds import checkpoint_info

        info = checkpoint_info(str(d))
        out.append(ModelChoice(name=model_name(rel, info.get("labels") or [], info.get("kind")), path=str(d),
                               label=label, kind=info.get("kind")))
    # shipped (indexed) models first
    return sorted(out, key=lambda m: (m.label is None, m.name))


def _open(ctx: AppContext, path: Path, kind: str, name: str) -> None:
    """Open a packed collection, or pack a folder / file of loose LoRAs first (notes on skipped files shown)."""
    from .sources import is_packed

    ctx.source, ctx.kind, ctx.path = name, kind, str(path)
    if not path.exists():
        ctx.problem = f"{path}: no such file or folder on the server."
        return
    try:
        if not is_packed(path):
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
        ctx.problem = f"Could not open {name}: {plain(e)}"


def _uploads(ctx: AppContext, sb) -> None:
    """Uploaded files as a collection: read and judged one by one (`lol.uploads.read_uploads`; the staging folder
    is removed at once), then the largest group fitting one base is packed under the app cache
    (`lol.app.sources.pack_uploads`); the other files are named with the base they fit."""
    from .sources import pack_uploads
    from ..uploads import read_uploads
    from .upload import ACCEPTED_TYPES, limits_caption, max_upload_mb

    files = sb.file_uploader("LoRA files", type=ACCEPTED_TYPES, accept_multiple_files=True, key="sidebar_upload",
                             help=limits_caption())
    ctx.kind, ctx.source = "upload", "uploaded files"
    state = st.session_state.get("_lol_upload")
    page = _page_id()
    if files:
        st.session_state["_lol_upload_page"] = page
    elif state and st.session_state.get("_lol_upload_page") == page:  # emptied by the user on this page: forget
        del st.session_state["_lol_upload"]
        state = None
    elif state:  # the uploader is empty again after a page switch: keep the files already read
        sb.caption(f"Using the {len(state[0])} file(s) uploaded earlier.")
        if sb.button("Forget them", key="upload_forget"):
            del st.session_state["_lol_upload"]
            state = None
    if not files and not state:
        sb.caption(limits_caption())
        ctx.problem = "Upload one or more LoRA files in the sidebar."
        return
    sig = tuple((f.name, f.size, getattr(f, "file_id", "")) for f in files) if files else state[0]
    if not state or state[0] != sig:
        import hashlib

        res = read_uploads(files, cache.shipped_bases(), require_base=False, max_mb=max_upload_mb())
        dest = app_data.cache_root() / "uploads" / hashlib.sha1(repr(sig).encode()).hexdigest()[:16]
        packed_path, errors, notes = pack_uploads(res.loras, dest)
        _prune(dest.parent, keep=16)
        state = (sig, str(packed_path) if packed_path else None, res.errors + errors, notes)
        st.session_state["_lol_upload"] = state
    _, packed_path, errors, notes = state
    ctx.upload_errors = list(errors)
    for e in errors:
        sb.error(e)
    for n in notes:
        sb.warning(n)
    if packed_path is None:
        ctx.problem = "None of the uploaded files could be read as a LoRA (see the messages in the sidebar)."
        return
    _open(ctx, Path(packed_path), kind="upload", name=f"{len(sig)} uploaded file(s)")


def _prune(folder: Path, keep: int) -> None:
    """Keep the ``keep`` newest packed uploads under the app cache (older sessions' uploads go)."""
    import shutil

    if not folder.is_dir():
        return
    dirs = sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in dirs[keep:]:
        shutil.rmtree(p, ignore_errors=True)


def _page_id() -> str:
    """The page being drawn (its script hash), to tell a page switch from a user action on the same page."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    c = get_script_run_ctx()
    return str(getattr(c, "page_script_hash", "")) if c is not None else ""
