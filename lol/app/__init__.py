"""The Streamlit explorer's shared parts (the pages themselves live in pages/, the entry point is app.py).

* `data`: where shipped collections, checkpoints, base models, notebook outputs and the cache are found;
* `sidebar`: the shared choice of collection, device and LoL model (`sidebar.context()` on every page);
* `cache`: cached loaders around the library (collections, features, predictions, UMAP, pipelines);
* `plots`: plotly figures styled for a projector, LoRA id in ``custom_data``;
* `upload`: uploaded LoRA files, staged in a temporary folder and read with `lol.formats.read_lora`;
* `nav`: the page list and links between pages; `errors`: one plain line instead of a traceback.

Nothing here imports Streamlit-free heavy libraries (diffusers, umap, transformers) at module level.
"""
