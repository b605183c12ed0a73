"""The shipped defaults keep the GL(r) promise, checked end to end through ``lol predict --task LABEL --json``.

For every label of the shipped checkpoint index (``$LOL_DATA/checkpoints/index.json``): a LoRA of the collection the
default was trained on is written as a PEFT folder, and written again with its factors moved in the file itself by a
random non-orthogonal R ∈ GL(r) per module (B ↦ B R, A ↦ R⁻¹ A: the same ΔW, condition number 4). Both must get the
same prediction. Other LoRAs of the collection (real changes of ΔW) must get different ones, so that a constant
model cannot pass.
"""
import json
from pathlib import Path

import pytest
import torch

from lol.cli import main
from lol.collection import open_collection
from lol.formats import save_peft
from lol.paths import checkpoint_index_path, checkpoints_root, collections_root
from lol.symmetry import gl_act, random_gl_like

pytestmark = pytest.mark.usefixtures("one_thread")

INDEX = checkpoint_index_path()
LABELS = sorted(json.loads(INDEX.read_text())) if INDEX.is_file() else []
# defaults that are not GL(r)-invariant today: `lol predict --task` refuses them until they are retrained
NOT_YET: dict[str, str] = {}  # labels whose shipped default is known not to be GL-invariant yet (none since Zoo v2)
OTHERS = (1, 2, 3, 4)  # LoRAs whose ΔW differ from LoRA 0's: real changes
RTOL, ATOL = 1e-4, 1e-5


def _collection_of(label: str) -> str:
    return _collection_of_folder(json.loads(INDEX.read_text())[label])


def _collection_of_folder(rel: str) -> str:
    """The collection a checkpoint folder of the index (``<collection>/<task>``) belongs to."""
    return (INDEX.parent / rel).resolve().relative_to(checkpoints_root().resolve()).parts[0]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """{collection: {"orig", "moved", "others": [...]}} PEFT folders, written once per collection."""
    made: dict[str, dict] = {}
    root = tmp_path_factory.mktemp("shipped")

    def get(name: str) -> dict:
        if name not in made:
            coll = open_collection(collections_root() / name)
            d = root / name
            lora = coll.lora(0, dtype=torch.float64)
            moved = gl_act(lora, random_gl_like(lora, seed=1, cond=4.0))
            for m, g in zip(lora, moved):  # the file's factors really move: B R, R⁻¹ A
                assert not torch.allclose(m.U, g.U, rtol=0.1) and torch.allclose(m.delta(), g.delta(), atol=1e-9)
            made[name] = {"orig": save_peft(lora, d / "orig", dtype=torch.float32),
                          "moved": save_peft(moved, d / "moved", dtype=torch.float32),
                          "others": [save_peft(coll.lora(i, dtype=torch.float64), d / f"other_{i}",
                                               dtype=torch.float32) for i in OTHERS]}
        return made[name]

    return get


def _predict(label: str, paths, capsys) -> list[float]:
    rc = main(["predict", "--task", label, "--json", *map(str, paths)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return [float(r["predictions"][label]) for r in json.loads(out.out)]


@pytest.mark.skipif(not LABELS, reason=f"no shipped checkpoint index at {INDEX}")
@pytest.mark.parametrize("label", [pytest.param(lab, marks=pytest.mark.xfail(strict=True, reason=NOT_YET[lab]))
                                   if lab in NOT_YET else lab for lab in LABELS])
def test_default_prediction_is_gl_invariant_in_the_file(label, files, capsys):
    f = files(_collection_of(label))
    orig, moved, *others = _predict(label, [f["orig"], f["moved"], *f["others"]], capsys)
    tol = ATOL + RTOL * abs(orig)
    assert abs(moved - orig) <= tol, f"{label}: {orig} for the LoRA, {moved} for the same ΔW with moved factors"
    change = max(abs(o - orig) for o in others)
    assert change > 20 * tol, f"{label}: other LoRAs (different ΔW) get {others} vs {orig}: the test cannot tell"


def test_index_lists_every_shipped_collection():
    """Every shipped collection has at least one default trained on it (so the test above covers each of them), or,
    for a sibling collection (same modules, another base: fashion_v1), defaults whose models read its modules and
    predict its labels."""
    if not LABELS:
        pytest.skip(f"no shipped checkpoint index at {INDEX}")
    root = Path(collections_root())
    shipped = {p.name for p in root.iterdir() if (p / "collection.json").is_file()}
    own = {_collection_of(lab) for lab in LABELS}
    for name in sorted(shipped - own):
        coll = open_collection(root / name)
        twins = [o for o in own if (root / o / "collection.json").is_file()
                 and open_collection(root / o).spec == coll.spec]
        assert twins, f"{name}: no shipped default was trained on it or on a collection with its modules"
        served = [lab for lab in LABELS if _collection_of(lab) in twins and lab in coll.labels]
        assert served, f"{name}: the defaults of {twins} predict none of its labels"


def test_every_default_knows_which_shipped_loras_it_trained_on():
    """Each shipped default's recorded split names LoRAs of the collection it was trained on as it is now (same
    fingerprint, or the same LoRAs with labels re-measured since: `lol.predict.trained_on`). Otherwise the app would
    count its training LoRAs as unseen and score it on them."""
    from lol.checkpoint import recorded_split
    from lol.predict import trained_on

    if not LABELS:
        pytest.skip(f"no shipped checkpoint index at {INDEX}")
    for rel in sorted(set(json.loads(INDEX.read_text()).values())):
        config = json.loads((INDEX.parent / rel / "config.json").read_text())
        coll = open_collection(collections_root() / _collection_of_folder(rel))
        assert trained_on(config, coll)[0], f"{rel}: trained on another version of {coll.path.name}; retrain it " \
                                            f"(`lol.experiments.retrain_checkpoints`)"
        split = recorded_split(config, coll.table["id"])
        n = {s: int((split == s).sum()) for s in ("train", "val", "test")}
        assert all(n.values()), f"{rel}: its recorded split names no {[s for s, k in n.items() if not k]} LoRA here"
        assert sum(n.values()) == sum(len(config["split"][s]) for s in n), f"{rel}: recorded ids missing here"
