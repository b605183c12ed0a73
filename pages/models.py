"""Models: the results table (model × task) and the figures the notebooks produced, read from their outputs; the
trained checkpoints with the metrics recorded when they were trained; and the speed of LoL against the standard
evaluation it replaces (``speed.md``: at the paper's scale and on our zoo)."""
import pandas as pd
import streamlit as st

from lol.app import fmt, glossary, results, views
from lol.app import data as app_data
from lol.app.sidebar import render

ctx = render()  # the shared sidebar: collection, device, LoL model
st.title("Models")

found = results.find_outputs()
if not found.tables and not found.figures:
    st.info("No notebook outputs yet: run the notebooks (e.g. `make notebooks`, or papermill) to fill "
            + ", ".join(f"`{p}`" for p in results.output_dirs()) + ".")
else:
    st.subheader("Results: model × task")
    names = [t.name for t in found.tables]
    pick = st.selectbox("Results table", names, key="models_table") if len(names) > 1 else (names[0] if names
                                                                                               else None)
    if pick is not None:
        t = found.tables[names.index(pick)]
        if t.error:
            st.error(t.error)
        else:
            wide = results.model_by_task(t.frame)
            shown = results.pretty_columns(wide if wide is not None else t.frame)
            config = views.metric_columns(shown)
            if "model" in shown.columns:
                config["model"] = st.column_config.Column(help=" ".join(
                    f"{k}: {v}" for k, v in glossary.KIND_HELP.items() if k in set(shown["model"].astype(str))))
            st.dataframe(results.mark_best(shown), width="stretch", height=min(600, 60 + 36 * len(shown)),
                         column_config=config, hide_index=isinstance(shown.index, pd.RangeIndex))
            st.caption(f"From `{t.path}`. Best value of each column in **bold on green** (lowest for errors and "
                       f"losses). Hover a column header for what its metric means.")
    if found.figures:
        st.subheader("Figures from the notebooks")
        figs = results.unique_figures(found.figures)
        names = [f.name for f in figs]
        pick = st.selectbox("Figure", names, key="models_figure") if len(names) > 1 else names[0]
        results.show_figure(figs[names.index(pick)])  # one at a time, at full width

st.subheader("Trained checkpoints")
rows = results.checkpoint_rows()
if rows is None or rows.empty:
    st.info(f"No checkpoints under `{app_data.data_root() / 'checkpoints'}` yet.")
else:
    st.dataframe(fmt.table(rows, digits=3), hide_index=True, width="stretch",
                 column_config=views.metric_columns(rows))
    st.caption("Metrics on each checkpoint's test split, as recorded when it was trained (`lol train`). Model kinds: "
               + "; ".join(f"**{k}**: {v}" for k, v in glossary.KIND_HELP.items() if k in set(rows["model"])))
    if ctx.model is not None:
        st.caption(f"The sidebar's LoL model: **{ctx.model.name}**.")

st.subheader("Speed: LoL against the standard evaluation")
reports = results.speed_reports()
if not reports:
    st.info("No speed report yet: `python -m bench speed` writes `results/speed.md` (`results/gpu/speed.md` on a "
            "GPU): LoL models against the standard evaluation of SD-1.5 and Qwen2-1.5B, both timed in one run.")
for i, path in enumerate(reports):
    lines = path.read_text().splitlines()
    with st.expander(f"`{path}`", expanded=i == 0):
        st.markdown("\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines))
