"""Model bundles: one folder holding everything ``wsi-pipeline predict`` needs from a finished run, nothing else.

``export-model OUT --strategy ROW --dest DIR`` writes::

    bundle.json                  format, strategy, classes, encoder, CLAMs, slide/tissue/tiling settings,
                                 the sha256 of every file, digests, and the card (CV metrics, cohort, speed)
    card.md                      the card, for people
    encoder/student.json         student rows: the distilled student's card (architecture, input, normalisation)
    encoder/student.safetensors  its weights (End2end rows: the fine-tuned student's)
    encoder/adapter.safetensors  end2end:lora: the fold's adapters + head, on the frozen student
    clam/fold_<k>.safetensors    one CLAM per fold the bundle keeps

The teacher row ships no encoder weights: ``bundle.json`` names the teacher (hub name, local weights
file or seed) and the sha256 of the weights its CLAMs were trained on, which loading checks.

Rows on a fixed encoder (teacher, reuse, retrain) keep the fold ensemble: the probabilities are the
mean of the fold CLAMs'. Those are the models whose held-out metrics the card reports, no model is
trained without a held-out check, and k CLAMs cost next to nothing beside the one encoder pass. An
End2end row's fold CLAMs each need their own fine-tuned encoder, so k of them would cost k encoder
passes: its bundle keeps one fold (by default the one whose chosen epoch had the lowest validation
loss). Loading a bundle reads JSON and safetensors only: nothing is unpickled.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipelines import __version__
from pipelines.deploy.card import bundle_licence, card_markdown
from pipelines.engine.run_dir import write_json, write_text

FORMAT = "wsi-pipeline-bundle/1"
CLAM_FIELDS = ("model", "size", "dropout", "k_sample", "subtyping", "instance_loss")  # what rebuilds a CLAM


class BundleError(ValueError):
    """A bundle that cannot be exported or used; the message names the file or field."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------------- export


def _fold_results(paths, cfg, entries, row: str) -> list[dict]:
    """The fold files of ``row``'s mil tasks as the run's config and slides define them now, each task done."""
    from mil.strategies import FoldJob
    from pipelines.engine.state import read_state
    from pipelines.stages.mil import fold_file, mil_keys

    keys = [k for k in mil_keys(cfg, entries) if FoldJob.from_key(k).row == row]
    results = []
    for key in keys:
        status = (read_state(paths, "mil", key) or {}).get("status", "pending")
        if status != "done" or not fold_file(paths, key).exists():
            raise BundleError(f"{paths.root}: mil task {key} is {status}, not done: finish the run "
                              "(`wsi-pipeline run` into it, see `wsi-pipeline status`) before exporting")
        results.append(json.loads(fold_file(paths, key).read_text()))
    return results


def _best_fold(folds: list[dict]) -> int:
    """The fold whose chosen epoch had the lowest validation loss (NaN counts as worst; ties: the lower fold)."""
    def best(f: dict) -> float:
        losses = [h.get("val_loss", math.nan) for h in f.get("history", [])]
        losses = [v for v in losses if v is not None and not math.isnan(v)]
        return min(losses) if losses else math.inf

    return min(folds, key=lambda f: (best(f), f["fold"]))["fold"]


def _summary_row(run: Path, row: str) -> dict:
    path = run / "results" / "summary.csv"
    if not path.exists():
        raise BundleError(f"{path} is missing: run the pipeline through the results stage before exporting")
    with path.open(newline="") as f:
        rows = {r["strategy"]: r for r in csv.DictReader(f)}
    if row not in rows:
        raise BundleError(f"strategy {row!r} is not in {path} (rows: {list(rows)})")
    return rows[row]


def _cohort_summary(paths, entries) -> dict:
    from collections import Counter

    mpps, backends = [], Counter()
    for e in entries:
        meta_path = paths.tissue_meta(e.slide_id)
        if meta_path.exists():
            meta = json.loads(meta_path.read_text())
            mpps.append(meta["mpp"])
            backends[meta["backend"]] += 1
    return {"n_slides": len(entries), "n_cases": len({e.case_id or e.slide_id for e in entries}),
            "labels": dict(sorted(Counter(e.label for e in entries if e.label).items())),
            "mpp_range": [min(mpps), max(mpps)] if mpps else None, "backends": dict(backends)}


def _teacher_reference(cfg, paths, entries) -> dict:
    """The teacher as a reference: its spec (weights path made absolute) and the sha256 of the weights used."""
    from features.encoders import PREPROCESSING
    from features.store import open_store
    from features.zoo import provenance

    spec = cfg.features.teacher
    if spec.weights is not None:
        spec = spec.model_copy(update={"weights": Path(spec.weights).absolute()})
    digest, attrs = None, {}
    for e in entries:  # imported stores (CLAM/TRIDENT features) record no weights: their model is not rebuilt here
        try:
            attrs = dict(open_store(paths.root, spec.label, e.slide_id).attrs)
        except FileNotFoundError:
            continue
        digest = attrs.get("weights_sha256")
        if digest:
            break
    if not digest:
        raise BundleError(f"{paths.root}: no teacher feature store this run extracted (imported features record no "
                          "weights): a teacher bundle needs the teacher that made the features, to embed new slides")
    return {"kind": "teacher", "label": spec.label, "spec": spec.model_dump(mode="json"), "weights_sha256": digest,
            "weights": spec.weights_source(), "random_weights": spec.random_weights, "provenance": provenance(spec.model),
            "preprocessing": {k: attrs[k] for k in PREPROCESSING if k in attrs}}


def _chosen_folds(strategy: str, fold_results: list[dict], folds: list[int] | None, end2end: bool) -> list[int]:
    """The folds a bundle holds: those asked for (all finished ones by default; End2end: its best, one only)."""
    available = [f["fold"] for f in fold_results]
    chosen = folds or ([_best_fold(fold_results)] if end2end else available)
    unknown = sorted(set(chosen) - set(available))
    if unknown:
        raise BundleError(f"strategy {strategy!r} has no finished fold {unknown}; folds: {available}")
    if end2end and len(set(chosen)) > 1:
        raise BundleError(f"{strategy}: each fold fine-tuned its own encoder, so a bundle holds one fold; give one --fold")
    return sorted(set(chosen))


def _student_encoder(cfg, paths, job, end2end: bool, models: Path, files: dict[str, Path]) -> dict:
    """The bundle's student encoder (End2end: the fold's fine-tuned weights or LoRA adapter), its files added."""
    from features.zoo import provenance
    from mil.strategies import job_files

    card_path = paths.student_dir / "student.json"
    card = json.loads(card_path.read_text())
    start = cfg.distill.student
    encoder = {"kind": "student", "label": f"student_{cfg.distill.student.label}", "teacher": card["teacher"],
               "card": "encoder/student.json", "weights": "encoder/student.safetensors", "adapter": None,
               "tuned": None, "student_start": None if start.random_weights else provenance(start.model)}
    files["encoder/student.json"] = card_path
    files["encoder/student.safetensors"] = paths.student_dir / "student.safetensors"
    if end2end:
        tuned = job_files(models, job)[1]
        encoder["tuned"] = f"End2end {job.finetune} fine-tuning, fold {job.fold}"
        if job.finetune == "lora":
            files["encoder/adapter.safetensors"] = tuned
            encoder["adapter"] = "encoder/adapter.safetensors"
        else:
            files["encoder/student.safetensors"] = tuned
    return encoder


def _task_fingerprints(paths, mil_keys: list[str], student_card: Path | None) -> dict:
    """The fingerprints of the mil tasks whose models the bundle holds (Reuse: the teacher's CLAMs it applies), and
    of the distillation for a student."""
    fingerprints = {}
    for key in mil_keys:
        state = paths.state("mil", key)
        fingerprints[f"mil/{key}"] = json.loads(state.read_text()).get("fingerprint") if state.exists() else None
    if student_card is not None:
        fingerprints["distill"] = json.loads(student_card.read_text()).get("fingerprint")
    return fingerprints


def export_bundle(run: Path, strategy: str, dest: Path, folds: list[int] | None = None) -> dict:
    """Write the bundle of results row ``strategy`` of the finished run ``run`` into ``dest``; returns bundle.json."""
    from mil.strategies import FoldJob, clam_file, strategy_rows
    from pipelines.stages.heatmaps import read_run

    cfg, entries, paths = read_run(Path(run).absolute())
    rows = strategy_rows(cfg.mil)
    if strategy not in rows:
        raise BundleError(f"strategy {strategy!r} is not a row of this run: {rows}")
    if strategy == "end2end:fpt":
        raise BundleError("end2end:fpt cannot be exported yet: its side network needs the teacher and FPT's own "
                          "inference path; export another row")
    fold_results = _fold_results(paths, cfg, entries, strategy)
    end2end = strategy.startswith("end2end")
    chosen = _chosen_folds(strategy, fold_results, folds, end2end)
    dest = Path(dest)
    if dest.exists() and any(dest.iterdir()):
        raise BundleError(f"{dest} exists and is not empty: give a new folder")
    models = paths.root / "models" / "mil"
    files: dict[str, Path] = {}  # bundle-relative name → source file
    job = FoldJob.from_key(f"{strategy.replace(':', '-')}.fold{chosen[0]}")
    base = job.needs[0] if job.kind == "reuse" else job
    for fold in chosen:
        files[f"clam/fold_{fold}.safetensors"] = clam_file(models, FoldJob(base.kind, fold, base.finetune))
    encoder = _teacher_reference(cfg, paths, entries) if job.features == "teacher" else \
        _student_encoder(cfg, paths, job, end2end, models, files)
    for source in files.values():
        if not source.exists():
            raise BundleError(f"{source} is missing: rerun the mil stage (wsi-pipeline run … --force mil)")
    by_fold = {f["fold"]: f for f in fold_results}
    summary = _summary_row(paths.root, strategy)
    keys = sorted({by_fold[f]["job"] for f in chosen} | {FoldJob(base.kind, f, base.finetune).key for f in chosen})
    fingerprints = _task_fingerprints(paths, keys, files.get("encoder/student.json") if encoder["kind"] == "student" else None)
    tmp = dest.with_name(f".{dest.name}.export.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for name, source in files.items():
        (tmp / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, tmp / name)
    shas = {name: sha256_file(tmp / name) for name in files}
    clam = {"config": {k: getattr(cfg.mil, k) for k in CLAM_FIELDS}, "folds": chosen, "combine": "mean",
            "files": [f"clam/fold_{f}.safetensors" for f in chosen]}
    settings = {"slides": {"backend": cfg.slides.backend, "default_mpp": cfg.slides.default_mpp},
                "tissue": cfg.tissue.model_dump(mode="json"), "tiling": cfg.tiling.model_dump(mode="json"),
                "features": {"dtype": cfg.features.dtype}}
    card = {"cv": {"folds": int(summary["folds"]), **{k: float(summary[k]) for k in summary if k.split("_")[0] in ("acc", "bacc", "auc")}},
            "fold_metrics": [by_fold[f]["metrics"] for f in chosen],
            "training_cohort": _cohort_summary(paths, entries),
            "encoder_patches_per_s": float(summary["encoder_patches_per_s"]) if summary.get("encoder_patches_per_s") else None,
            "encoder_params": int(float(summary["encoder_params"])) if summary.get("encoder_params") else None,
            "fingerprints": fingerprints, "toolkit_version": __version__, "run": str(paths.root),
            "created": datetime.now(UTC).isoformat(timespec="seconds")}
    meta = {"format": FORMAT, "strategy": strategy, "classes": by_fold[chosen[0]]["classes"], "encoder": encoder,
            "clam": clam, "settings": settings, "files": shas, "card": card, "licence": bundle_licence(encoder)}
    meta["digests"] = digests(meta)  # informational: loading recomputes them
    write_json(tmp / "bundle.json", meta)
    write_text(tmp / "card.md", card_markdown(meta))
    if dest.exists():
        dest.rmdir()
    tmp.rename(dest)
    return meta


def digests(meta: dict) -> dict[str, str]:
    """Identities of the bundle's encoder and of its CLAMs, from bundle.json's content and its files' sha256: what
    a prediction run's fingerprints cover, so an edited bundle.json reruns what it changes."""
    files = meta["files"]
    encoder_files = {n: sha for n, sha in files.items() if n.startswith("encoder/")}
    clam_files = {n: files[n] for n in meta["clam"]["files"]}
    return {"encoder": _digest([meta["encoder"], encoder_files]),
            "clam": _digest([meta["clam"], meta["classes"], clam_files])}


# ---------------------------------------------------------------------------------------------------- loading


@dataclass(eq=False)  # hashed by identity: workers cache the models built from one
class Bundle:
    """A bundle folder as read from its bundle.json (files checked against their sha256)."""

    path: Path
    meta: dict

    def digest(self, part: str) -> str:
        """``encoder`` or ``clam``: recomputed from bundle.json, never read from it."""
        return digests(self.meta)[part]

    @property
    def classes(self) -> list[str]:
        return self.meta["classes"]

    @property
    def encoder_label(self) -> str:
        return self.meta["encoder"]["label"]

    @property
    def cheap_encoder(self) -> bool:
        """A distilled student: cheap enough that predict's heatmaps take CLAM's overlapping second pass by default."""
        return self.meta["encoder"]["kind"] == "student"

    def file(self, name: str) -> Path:
        return self.path / name

    def encoder(self, device: str = "auto", precision: str = "auto"):
        """The bundle's encoder (an ``Encoder``), checked to be the model its CLAMs were trained on."""
        from features.encoders import EncoderConfig, create_encoder, preprocessing_mismatch

        enc = self.meta["encoder"]
        if enc["kind"] == "teacher":
            spec = EncoderConfig.model_validate({**enc["spec"], "device": device, "precision": precision})
            encoder = create_encoder(spec, field=f"{self.path / 'bundle.json'}: encoder.spec")
            if encoder.digest != enc["weights_sha256"]:
                raise BundleError(f"{self.path / 'bundle.json'}: the teacher built from encoder.spec has weights sha256 "
                                  f"{encoder.digest[:12]}…, not the {enc['weights_sha256'][:12]}… its CLAMs were trained on "
                                  "(another weights file, hub revision or seed)")
            changed = preprocessing_mismatch(encoder, enc.get("preprocessing", {}))
            if changed:
                raise BundleError(f"{self.path / 'bundle.json'}: the teacher built from encoder.spec preprocesses tiles "
                                  f"otherwise than when its CLAMs were trained ({changed}): pin them in encoder.spec")
            return encoder
        from distill.model import load_student

        encoder, _ = load_student(self.path / "encoder", device=device, precision=precision)
        if enc.get("adapter"):
            from mil.finetune.lora import load_adapter

            load_adapter(encoder.model, self.file(enc["adapter"]))
            encoder.model.eval()
            encoder._digest = None  # the weights changed
        return encoder

    def clams(self, device: str = "auto") -> list:
        """The bundle's CLAMs, in eval mode on ``device``."""
        from mil.strategies import load_clam
        from mil.train import MILConfig

        cfg = MILConfig.model_validate(self.meta["clam"]["config"])
        return [load_clam(cfg, self.file(name), len(self.classes), device) for name in self.meta["clam"]["files"]]


def load_bundle(path: Path, *, verify: bool = True) -> Bundle:
    """Read ``path/bundle.json``; with ``verify``, check every file against its recorded sha256."""
    path = Path(path).absolute()
    meta_path = path / "bundle.json"
    if not meta_path.is_file():
        raise BundleError(f"{path}: not a model bundle (no bundle.json); make one with `wsi-pipeline export-model`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise BundleError(f"{meta_path}: format {meta.get('format')!r}, this toolkit reads {FORMAT!r}")
    if verify:
        for name, sha in meta["files"].items():
            file = path / name
            if not file.is_file():
                raise BundleError(f"{file}: missing from the bundle")
            if sha256_file(file) != sha:
                raise BundleError(f"{file}: its sha256 differs from bundle.json's: the file was changed or damaged")
        spec = meta["encoder"].get("spec") or {}
        if spec.get("weights") and not Path(spec["weights"]).is_file():
            raise BundleError(f"{meta_path}: encoder.spec.weights {spec['weights']}: file not found (the teacher's "
                              "weights are referenced, not copied: put the file there or edit the path)")
    return Bundle(path, meta)
