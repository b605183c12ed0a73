"""The LoL explorer: `streamlit run app.py` (or `make app`). This entrypoint runs on every rerun of every page: it
draws the shared sidebar (collection, device, LoL model; `lol.app.sidebar`) once, so its widgets keep their values
across page switches, then runs the chosen page from app_pages/ (not ``pages/``: streamlit would run a script in a
folder of that name without this entrypoint and show its own navigation beside ours). The app computes nothing
itself: it shows what the library (formats, collections, features, models, metrics, zoo) produces."""
import streamlit as st

from lol.app import nav, sidebar, warmup
from lol.app.errors import guard

# the favicon is a local file (served by this server): nothing is fetched from the internet, even offline
st.set_page_config(page_title="LoL explorer — Learning on LoRAs", page_icon=str(nav.REPO / "assets" / "favicon.png"),
                   layout="wide")

# a projector is 1280×720: less empty space above the title (streamlit's default top padding is 6rem)
st.html("<style>.stMainBlockContainer, .block-container {padding-top: 2rem;}</style>")
page = st.navigation(nav.pages())


def show() -> None:
    sidebar.render()  # the pages read its choice with `sidebar.context()`
    page.run()


guard(show, what=f"the {page.title} page")
warmup.start()  # once per server (`python scripts/serve.py` starts it before the first visit): fill every cache
