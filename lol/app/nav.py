"""The explorer's pages and the links between them: a LoRA chosen anywhere (a click on a chart, a table row) opens
its detail view on the Collection page or the Generate page."""
from __future__ import annotations

import streamlit as st

from .data import REPO

__all__ = ["PAGES", "pages", "open_lora", "chosen_lora"]

# (file under pages/, title, icon); the first is the landing page
PAGES = (
    ("collection.py", "Collection", ":material/table_view:"),
    ("predict.py", "Predict", ":material/query_stats:"),
    ("embeddings.py", "Embeddings", ":material/scatter_plot:"),
    ("generate.py", "Generate", ":material/image:"),
    ("membership.py", "Membership", ":material/how_to_reg:"),
    ("language_models.py", "Language models", ":material/translate:"),
    ("models.py", "Models", ":material/leaderboard:"),
)

_KEY = "lol_lora_id"


def pages() -> list:
    return [st.Page(str(REPO / "pages" / f), title=t, icon=i, default=(k == 0), url_path=f.removesuffix(".py"))
            for k, (f, t, i) in enumerate(PAGES)]


def open_lora(lora_id: str, page: str = "collection.py") -> None:
    """Remember ``lora_id`` as the chosen LoRA and go to ``page`` (its detail view, or Generate)."""
    st.session_state[_KEY] = str(lora_id)
    st.switch_page(str(REPO / "pages" / page))


def chosen_lora(ids) -> str | None:
    """The LoRA chosen elsewhere (if it is in ``ids``), else None."""
    v = st.session_state.get(_KEY)
    return v if v is not None and v in set(map(str, ids)) else None


def current_lora() -> str | None:
    """The LoRA chosen on any page so far (None before any choice)."""
    return st.session_state.get(_KEY)


def set_chosen(lora_id: str) -> None:
    st.session_state[_KEY] = str(lora_id)


def sync_widget(key: str, ids) -> None:
    """Before a LoRA selectbox is drawn: show the LoRA chosen elsewhere (or the first one)."""
    ids = [str(i) for i in ids]
    want = chosen_lora(ids) or (st.session_state.get(key) if st.session_state.get(key) in ids else ids[0])
    if st.session_state.get(key) != want:
        st.session_state[key] = want
    st.session_state[_KEY] = want


def chosen_from_widget(key: str) -> None:
    """on_change callback of a LoRA selectbox: its value becomes the chosen LoRA on every page."""
    st.session_state[_KEY] = str(st.session_state[key])


def choose_once(source: str, lora_id: str | None) -> bool:
    """Make ``lora_id`` the chosen LoRA when ``source`` (a table or chart) reports a *new* selection; a selection
    that merely persists across reruns does not override a later choice made elsewhere. True when it changed."""
    k = f"_lol_last_{source}"
    if lora_id is None or st.session_state.get(k) == lora_id:
        return False
    st.session_state[k] = lora_id
    st.session_state[_KEY] = str(lora_id)
    return True
