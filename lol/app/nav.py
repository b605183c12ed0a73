"""The explorer's pages and the links between them: a LoRA chosen anywhere (a click or a box on a chart, a table row,
a select box) is the chosen LoRA on every page — marked on every per-LoRA chart (linked selection), shown by every
LoRA select box — and opens its detail view on the Collection page or the Generate page."""
from __future__ import annotations

import streamlit as st

from ..paths import REPO

__all__ = ["PAGES", "REPO", "pages", "open_lora", "current_lora", "highlighted", "set_chosen", "lora_select",
           "choose_once", "take_selection"]

# (file under app_pages/, title, icon); the first is the landing page
PAGES = (
    ("collection.py", "Collection", ":material/table_view:"),
    ("predict.py", "Predict", ":material/query_stats:"),
    ("embeddings.py", "Embeddings", ":material/scatter_plot:"),
    ("generate.py", "Generate", ":material/image:"),
    ("membership.py", "Membership", ":material/how_to_reg:"),
    ("language_models.py", "Language models", ":material/translate:"),
    ("models.py", "Models", ":material/leaderboard:"),
)

_KEY, _SEL = "lol_lora_id", "lol_selection"  # the chosen LoRA; the LoRAs selected with it (a box on a chart)


def pages() -> list:
    return [st.Page(str(REPO / "app_pages" / f), title=t, icon=i, default=(k == 0), url_path=f.removesuffix(".py"))
            for k, (f, t, i) in enumerate(PAGES)]


def set_chosen(lora_id: str, selection=None) -> None:
    """``lora_id`` becomes the chosen LoRA on every page, ``selection`` (default: just it) the highlighted ones."""
    st.session_state[_KEY] = str(lora_id)
    st.session_state[_SEL] = [str(i) for i in selection] if selection else [str(lora_id)]


def open_lora(lora_id: str, page: str = "collection.py") -> None:
    """Remember ``lora_id`` as the chosen LoRA and go to ``page`` (its detail view, or Generate)."""
    set_chosen(lora_id)
    st.switch_page(str(REPO / "app_pages" / page))


def current_lora() -> str | None:
    """The LoRA chosen on any page so far (None before any choice)."""
    return st.session_state.get(_KEY)


def highlighted() -> list[str]:
    """The LoRAs every per-LoRA chart marks: the last selection made anywhere (a click, a box, a table row, a
    select box), the chosen LoRA first."""
    return list(st.session_state.get(_SEL) or ([st.session_state[_KEY]] if st.session_state.get(_KEY) else []))


def lora_select(ids, key: str, label: str = "LoRA", where=st) -> str:
    """A LoRA select box (in ``where``: a column, the sidebar) that shows the LoRA chosen elsewhere (or its first);
    choosing here makes it the chosen LoRA on every page."""
    ids = [str(i) for i in ids]
    want = current_lora() if current_lora() in ids else (st.session_state.get(key) if st.session_state.get(key)
                                                          in ids else ids[0])
    if st.session_state.get(key) != want:
        st.session_state[key] = want
    if current_lora() != want:
        set_chosen(want)
    return where.selectbox(label, ids, key=key, on_change=lambda: set_chosen(st.session_state[key]))


def take_selection(key: str) -> list[str]:
    """Before a per-LoRA chart ``key`` is drawn: its selection (click, box or lasso; kept by streamlit under its
    key) becomes the selection of every page when it is new (`choose_once`), so this chart rings it at once.
    Returns the chart's selected ids."""
    from .plots import selected_ids

    ids = selected_ids(st.session_state.get(key))
    choose_once(key, ids)
    return ids


def choose_once(source: str, ids) -> bool:
    """Make ``ids`` (a click, a box or lasso on a chart, a table row) the selection, its first the chosen LoRA, when
    ``source`` reports a *new* selection; a selection that merely persists across reruns does not override a later
    choice made elsewhere. True when it changed."""
    ids = [str(i) for i in ids or []]
    k = f"_lol_last_{source}"
    if not ids or st.session_state.get(k) == ids:
        return False
    st.session_state[k] = ids
    set_chosen(ids[0], ids)
    return True
