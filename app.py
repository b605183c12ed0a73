"""The LoL explorer: `streamlit run app.py` (or `make app`). Pages live in pages/; the shared sidebar (collection,
device, LoL model) and every cached loader live in lol.app. The app computes nothing itself: it shows what the
library (formats, collections, features, models, metrics, zoo) produces."""
import streamlit as st

from lol.app import nav, warmup
from lol.app.errors import guard

# the favicon is a local file (served by this server): nothing is fetched from the internet, even offline
st.set_page_config(page_title="LoL explorer — Learning on LoRAs", page_icon=str(nav.REPO / "assets" / "favicon.png"),
                   layout="wide")

# a projector is 1280×720: less empty space above the title (streamlit's default top padding is 6rem)
st.html("<style>.stMainBlockContainer, .block-container {padding-top: 2rem;}</style>")
page = st.navigation(nav.pages())
guard(page.run, what=f"the {page.title} page")  # each page draws the shared sidebar first (lol.app.sidebar.render)
warmup.start()  # once per server (`python scripts/serve.py` starts it before the first visit): fill every cache
