"""``locus encode-study``: the configured encoder offline, findings and a relevance map as NIfTI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from node.cli import main as locus_cli
from node.cli_demo import SAMPLE_STUDY
from tests.pipelines.study_encoder.conftest import TINY_MODEL


def _env(tiny_dirs: dict[str, Path], tmp_path: Path) -> dict[str, str]:
    return {"LOCUS_STORAGE__DATA_DIR": str(tmp_path), "LOCUS_MODELS__DIR": str(tiny_dirs["root"]),
            "LOCUS_MODELS__STUDY_ENCODER_CHECKPOINT": tiny_dirs["checkpoint"].name,
            "LOCUS_MODELS__STUDY_ENCODER_TEXT_DIR": "text", "LOCUS_MODELS__STUDY_ENCODER_CONFIG_DIR": "configs",
            "LOCUS_MODELS__STUDY_ENCODER_MODEL": TINY_MODEL, "LOCUS_MODELS__DEVICE": "cpu",
            "LOCUS_MODELS__STUDY_ENCODER_THRESHOLDS": '{"pleural_effusion": 0.5}'}  # fmt: skip


def test_encode_study_writes_findings_and_relevance_nifti(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    import nibabel as nib

    out = tmp_path / "rel.nii.gz"
    res = CliRunner().invoke(locus_cli, ["encode-study", str(SAMPLE_STUDY), "--relevance", "pleural_effusion",
                                         "--nifti", str(out), "--json"], env=_env(tiny_dirs, tmp_path))  # fmt: skip
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    enc = data["encoding"]
    assert len(enc["embedding"]) == 16 and len(enc["findings"]) == 16
    assert {f["code"] for f in enc["flags"]} == {"hlip_orientation_unvalidated", "hlip_thorax_cropped"}
    assert [f["present"] is not None for f in enc["findings"]].count(True) == 1
    assert data["relevance"]["finding"] == "Pleural effusion" and data["relevance"]["shape_zyx"] == [16, 48, 48]
    img = nib.load(str(out))
    assert img.shape == (48, 48, 16)  # NIfTI (i, j, k) = (x, y, z)
    arr = np.asarray(img.dataobj)
    assert arr.dtype == np.float32 and np.all(arr >= 0)
    # the slab is centred on the phantom's lungs: z centre of the map near the lung centre (1305 mm)
    z_centre = (img.affine @ np.array([23.5, 23.5, 7.5, 1.0]))[2]
    assert abs(z_centre - 1305.0) < 30.0

    text = CliRunner().invoke(locus_cli, ["encode-study", str(SAMPLE_STUDY)], env=_env(tiny_dirs, tmp_path))
    assert text.exit_code == 0, text.output
    assert "AI-derived" in text.output and "Pleural effusion" in text.output and "hlip_orientation_unvalidated" in text.output


def test_encode_study_without_configured_encoder(tmp_path: Path) -> None:
    res = CliRunner().invoke(locus_cli, ["encode-study", str(SAMPLE_STUDY)], env={"LOCUS_STORAGE__DATA_DIR": str(tmp_path)})
    assert res.exit_code == 1 and "no study encoder configured" in res.output


def test_relevance_needs_an_output(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    res = CliRunner().invoke(locus_cli, ["encode-study", str(SAMPLE_STUDY), "--relevance", "emphysema"],
                             env=_env(tiny_dirs, tmp_path))  # fmt: skip
    assert res.exit_code == 2 and "go together" in res.output


def test_encode_study_accepts_nifti_with_the_published_hu_and_spacing_rules(tiny_dirs: dict[str, Path],
                                                                           tmp_path: Path) -> None:  # fmt: skip
    import SimpleITK as sitk

    from tests.pipelines.study_encoder.phantoms import torso

    vol = torso(60, 5.0, -150.0, (-60.0, 120.0))
    hu = vol.to_sitk()
    sitk.WriteImage(sitk.Cast(hu, sitk.sitkFloat32), str(tmp_path / "hu.nii.gz"))
    stored = sitk.Cast(hu, sitk.sitkFloat32) + 1024.0  # CT-RATE style raw values
    stored.SetSpacing((1.0, 1.0, 1.0))  # header spacing that the metadata table overrides
    sitk.WriteImage(stored, str(tmp_path / "raw.nii.gz"))
    env = _env(tiny_dirs, tmp_path)
    sp = hu.GetSpacing()

    def run(*args: str) -> dict:
        res = CliRunner().invoke(locus_cli, ["encode-study", *args, "--json"], env=env)
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)

    ref = run(str(tmp_path / "hu.nii.gz"))
    raw = run(str(tmp_path / "raw.nii.gz"), "--rescale", "1", "-1024", "--xy-spacing", str(sp[0]),
              "--z-spacing", str(sp[2]))
    assert len(ref["encoding"]["embedding"]) == 16
    assert np.allclose(ref["encoding"]["embedding"], raw["encoding"]["embedding"], atol=1e-5)
    assert any("--rescale" in n for n in raw["input_notes"])
    unscaled = CliRunner().invoke(locus_cli, ["encode-study", str(tmp_path / "raw.nii.gz")], env=env)
    assert "look like stored values" in unscaled.output  # said before the (expected) refusal

    refused = CliRunner().invoke(locus_cli, ["encode-study", str(SAMPLE_STUDY), "--rescale", "1", "0"], env=env)
    assert refused.exit_code != 0 and "NIfTI input only" in refused.output
