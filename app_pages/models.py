"""Models: the results table (model × task) and the figures the notebooks produced, read from their outputs
(`lol.outputs`); the trained checkpoints with the metrics recorded when they were trained (`lol.catalog`); and the
speed of LoL against the standard evaluation it replaces (``speed.md``: at the paper's scale and on our zoo)."""
import pandas as pd
import streamlit as st

from lol import outputs
from lol.app import fmt, glossary, views
from lol.app.sidebar import context
from lol.catalog import metrics_table
from lol.paths import data_root, results_dirs


def show_figure(fig: outputs.Figure) -> None:
    try:
        if fig.kind == "plotly":
            import plotly.io as pio

            st.plotly_chart(pio.from_json(fig.path.read_text()), width="stretch", key=f"nbfig_{fig.path}")
        else:
            st.image(str(fig.path), width="stretch")
        st.caption(f"{fig.name} — `{fig.path.name}`")
    except (OSError, ValueError) as e:  # a broken figure file (unreadable image, bad plotly JSON): say which
        st.warning(f"{fig.path}: could not show this figure ({type(e).__name__}: {e})")


ctx = context()  # what the sidebar (drawn by app.py) chose: collection, device, LoL model
st.title("Models")
found = outputs.find_outputs()
if not found.tables and not found.figures:
    st.info("No notebook outputs yet: run the notebooks (e.g. `make notebooks`, or papermill) to fill "
            + ", ".join(f"`{p}`" for p in results_dirs() or [data_root() / "results"]) + ".")
else:
    st.subheader("Results: model × task")
    names = [t.name for t in found.tables]
    pick = st.selectbox("Results table", names, key="models_table") if len(names) > 1 else next(iter(names), None)
    t = found.tables[names.index(pick)] if pick is not None else None
    if t is not None and t.error:
        st.error(t.error)
    elif t is not None:
        wide = outputs.model_by_task(t.frame)
        shown = outputs.pretty_columns(wide if wide is not None else t.frame)
        config = views.metric_columns(shown)
        if "model" in shown.columns:
            config["model"] = st.column_config.Column(help=" ".join(
                f"{k}: {v}" for k, v in glossary.KIND_HELP.items() if k in set(shown["model"].astype(str))))
        st.dataframe(fmt.mark_best(shown), width="stretch", height=min(600, 60 + 36 * len(shown)),
                     column_config=config, hide_index=isinstance(shown.index, pd.RangeIndex))
        st.caption(f"From `{t.path}`. Best value of each column in **bold on green** (lowest for errors and "
                   f"losses). Hover a column header for what its metric means.")
    if found.figures:
        st.subheader("Figures from the notebooks")
        figs = outputs.unique_figures(found.figures)
        names = [f.name for f in figs]
        pick = st.selectbox("Figure", names, key="models_figure") if len(names) > 1 else names[0]
        show_figure(figs[names.index(pick)])  # one at a time, at full width

st.subheader("Trained checkpoints")
rows = metrics_table(ctx.models)
if rows is None or rows.empty:
    st.info(f"No checkpoints under `{data_root() / 'checkpoints'}` yet.")
else:
    st.dataframe(fmt.table(rows, digits=3), hide_index=True, width="stretch", column_config=views.metric_columns(rows))
    st.caption("Metrics on each checkpoint's test split, as recorded when it was trained (`lol train`). Model kinds: "
               + "; ".join(f"**{k}**: {v}" for k, v in glossary.KIND_HELP.items() if k in set(rows["model"])))
    if ctx.model is not None:
        st.caption(f"The sidebar's LoL model: **{ctx.model.title}**.")

st.subheader("Speed: LoL against the standard evaluation")
reports = outputs.speed_reports()
if not reports:
    st.info("No speed report yet: `python -m bench speed` writes `results/speed.md` (`results/gpu/speed.md` on a "
            "GPU): LoL models against the standard evaluation of SD-1.5 and Qwen2-1.5B, both timed in one run.")
for i, path in enumerate(reports):
    lines = path.read_text().splitlines()
    with st.expander(f"`{path}`", expanded=i == 0):
        st.markdown("\n".join(lines[1:] if lines and lines[0].startswith("# ") else lines))
