"""slides.csv parsing and the YAML config: every error names its line/column or field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config import ConfigError, RunConfig, commented_template, load_config
from pipelines.manifest import ManifestError, SlideEntry, read_manifest, sanitize_slide_id


def _csv(tmp_path: Path, text: str | bytes, name: str = "slides.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_reads_all_columns_and_resolves_relative_paths(tmp_path):
    (tmp_path / "sub").mkdir()
    path = _csv(tmp_path / "sub", "slide_path,slide_id,label,case_id,split,mpp\n"
                                  "a.svs,A1,tumor,p1,train,0.25\n"
                                  "/abs/b.tif,,normal,,,\n")
    first, second = read_manifest(path)
    assert first.slide_path == tmp_path / "sub" / "a.svs"
    assert (first.slide_id, first.label, first.case_id, first.split, first.mpp, first.line) == ("A1", "tumor", "p1", "train", 0.25, 2)
    assert second.slide_path == Path("/abs/b.tif") and second.slide_id == "b"
    assert second.case_id == "b" and second.label == "normal" and second.mpp is None and second.split is None


def test_quoted_multiline_fields_keep_true_line_numbers(tmp_path):
    path = _csv(tmp_path, 'slide_path,label\n"a.svs","multi\nline"\nb.svs,x\nb2.svs,y,extra\n"c.svs","two\nlines",z\n')
    with pytest.raises(ManifestError) as err:
        read_manifest(path)
    assert err.value.problems == ["line 5: 3 fields, but the header has 2", "line 6: 3 fields, but the header has 2"]


def test_bom_and_blank_lines_are_fine(tmp_path):
    entries = read_manifest(_csv(tmp_path, "\ufeffslide_path\n\na.svs\n\n"))
    assert [e.slide_id for e in entries] == ["a"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", "empty"),
        ("path,label\na.svs,x\n", "line 1: missing required column `slide_path`"),
        ("slide_path,slide_id\na.svs,S\nb.svs,S\n", "line 3, column slide_id: duplicate id 'S', already used on line 2"),
        ("slide_path\nx/a.svs\ny/a.svs\n", "add a `slide_id` column"),
        ("slide_path,mpp\na.svs,fast\n", "line 2, column mpp: 'fast' is not a number of µm per pixel"),
        ("slide_path,mpp\na.svs,-0.5\n", "line 2, column mpp"),
        ("slide_path,mpp\na.svs,500\n", "strictly between 0.05 and 20"),
        ("slide_path,split\na.svs,holdout\n", "line 2, column split: 'holdout'"),
        ("slide_path,label\n,x\n", "line 2, column slide_path: empty"),
        ("slide_path\n", "no slides"),
        ("slide_path,slide_path\na,b\n", "appears more than once"),
    ],
)
def test_bad_csvs_name_line_and_column(tmp_path, text, expected):
    with pytest.raises(ManifestError) as err:
        read_manifest(_csv(tmp_path, text))
    assert expected in str(err.value)


def test_every_problem_is_reported_at_once(tmp_path):
    with pytest.raises(ManifestError) as err:
        read_manifest(_csv(tmp_path, "slide_path,mpp,split\na.svs,x,train\na.svs,0.5,nope\n"))
    assert len(err.value.problems) == 2


def test_non_utf8_bytes_name_the_line(tmp_path):
    path = _csv(tmp_path, b"slide_path,label\na.svs,ok\nb\xe9.svs,bad\n")
    with pytest.raises(ManifestError, match="line 3: not UTF-8"):
        read_manifest(path)


def test_missing_csv_and_unknown_columns(tmp_path, caplog):
    with pytest.raises(ManifestError, match="file not found"):
        read_manifest(tmp_path / "none.csv")
    entries = read_manifest(_csv(tmp_path, "slide_path,stain\na.svs,HE\n"))
    assert len(entries) == 1 and "unknown column" in caplog.text and "stain" in caplog.text


@pytest.mark.parametrize("raw, clean", [("../../etc/passwd", "etc_passwd"), ("TCGA-A1 B2.01", "TCGA-A1_B2.01"),
                                        (".hidden", "hidden"), ("///", "slide"), ("a/b\\c", "a_b_c")])
def test_slide_ids_are_sanitised(raw, clean):
    assert sanitize_slide_id(raw) == clean


def test_sanitised_ids_cannot_escape_the_run_directory(tmp_path):
    entries = read_manifest(_csv(tmp_path, "slide_path,slide_id\na.svs,../../../x\n"))
    assert entries[0].slide_id == "x"


def test_config_rejects_unknown_keys_naming_the_field(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("tissue:\n  sthresh: 10\n  a_tt: 3\ntiling:\n  patch_size: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert "tissue.a_tt: unknown field" in str(err.value)
    assert "tiling.patch_size" in str(err.value)
    path.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)
    path.write_text("tissue: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_template_is_valid_and_presets_are_not_shadowed():
    assert RunConfig.model_validate(yaml.safe_load(commented_template())) == RunConfig()
    text = commented_template().replace("preset: null", "preset: tcga")
    assert RunConfig.model_validate(yaml.safe_load(text)).tissue.a_t == 16


def test_docs_list_every_config_field():
    from pipelines.config import config_reference_markdown

    docs = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    def walk(model, prefix):
        for name, field in model.model_fields.items():
            yield f"{prefix}{name}"
            if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields"):
                yield from walk(field.annotation, f"{prefix}{name}.")

    for dotted in walk(RunConfig, ""):
        assert f"`{dotted}`" in docs, f"docs/configuration.md misses {dotted}"
    assert docs == config_reference_markdown(), "regenerate: python -m pipelines.config > docs/configuration.md"


def test_a_corrected_label_reruns_what_reads_labels_and_not_the_distillation():
    """The label-free distillation's fingerprint ignores labels, cases and splits; MIL's, the results' and the QC
    table's follow them."""
    from dataclasses import replace

    from pipelines.engine.plan import Task, cohort_fingerprint
    from pipelines.engine.state import COHORT
    from pipelines.stages.table import STAGES

    cfg = RunConfig()
    entries = [SlideEntry(f"s{i}", Path(f"/slides/s{i}.svs"), line=i + 2, label="tumor" if i % 2 else "normal")
               for i in range(4)]
    corrected = [replace(entries[0], label="tumor"), *entries[1:]]

    def fp(stage: str, scope: str, rows: list[SlideEntry], key: str = COHORT) -> str:
        return cohort_fingerprint(cfg, Task(STAGES[stage], stage, key, scope=scope), [(e, "upstream") for e in rows])

    assert fp("distill", "cohort", entries) == fp("distill", "cohort", corrected)
    for stage in ("qc", "results"):
        assert fp(stage, "cohort", entries) != fp(stage, "cohort", corrected)
    assert fp("mil", "fold", entries, "teacher.fold0") != fp("mil", "fold", corrected, "teacher.fold0")


def test_relative_paths_in_the_config_are_resolved_where_the_command_runs(tmp_path, monkeypatch):
    """Workers run in other directories (a `dask worker`'s own, a SLURM job's): a relative weights file, mask
    folder or bundle means the one beside the command, and reaches them as an absolute path."""
    (tmp_path / "masks").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig.model_validate({"features": {"teacher": {"model": "vit_tiny", "weights": "w/uni.safetensors"}},
                                    "distill": {"student": {"model": "vit_tiny", "weights": "~/s.safetensors"}},
                                    "tissue": {"mask_dir": "masks"}, "predict": {"bundle": "bundle"}})
    assert cfg.features.teacher.weights == tmp_path / "w" / "uni.safetensors"
    assert cfg.distill.student.weights == Path("~/s.safetensors").expanduser()
    assert cfg.tissue.mask_dir == tmp_path / "masks" and cfg.predict.bundle == tmp_path / "bundle"
