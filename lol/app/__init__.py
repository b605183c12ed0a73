"""The Streamlit explorer's rendering layer (the pages live in app_pages/, the entry point is app.py): `sidebar` (the
shared choice of collection, device and LoL model, drawn once by app.py), `cache` (cached loaders around the
library), `views` and `generation` (view pieces), `answers` (uploads), `plots` (plotly figures for a projector),
`fmt` and `glossary` (numbers and words for people), `nav` (pages and the chosen LoRA), `errors` (the error
boundary), `warmup` (caches filled at server start). Everything they show is computed by the library.
"""
