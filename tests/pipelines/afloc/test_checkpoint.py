"""Strict loading of the published Lightning layout, and refusal of anything else (YH0517/AFLoc checkpoints, PyTorch Lightning 1.1.4)."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch

from pipelines.errors import ModelError
from pipelines.models.afloc.checkpoint import POSITION_IDS, load_strict, read_checkpoint
from pipelines.models.afloc.encoder import AflocConfig, AflocEncoder
from pipelines.models.afloc.model import build_model
from tests.pipelines.afloc.conftest import CONFIG, envelope, published_state_dict


def test_published_layout_loads_strictly_and_bit_exactly(afloc_assets: dict[str, Any]) -> None:
    ckpt = read_checkpoint(afloc_assets["ckpt"])
    assert ckpt.sha256 == hashlib.sha256(afloc_assets["ckpt"].read_bytes()).hexdigest()
    assert ckpt.lightning_version == "1.1.4" and ckpt.epoch == 3 and ckpt.global_step == 1234
    assert any(POSITION_IDS in a for a in ckpt.adjustments)
    assert {"optimizer_states", "callbacks", "lr_schedulers", "native_amp_scaling_state"} <= set(ckpt.ignored_entries)
    assert "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint" in ckpt.placeholders
    # The OmegaConf config is recovered as plain data without OmegaConf.
    assert ckpt.hyper_parameters["data"]["text"]["word_num"] == 97
    assert ckpt.hyper_parameters["model"]["afloc"] == {"temp1": 4.0, "temp2": 5.0, "temp3": 10.0}
    assert ckpt.hyper_parameters["lightning"]["trainer"]["gpus"] == [0, 1]
    fresh = build_model(afloc_assets["text_dir"])
    load_strict(fresh, ckpt.state_dict)
    for k, v in afloc_assets["model"].state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.state_dict()["img_encoder.model.bn1.num_batches_tracked"].dtype == torch.int64


def test_encoder_records_hashes(afloc_assets: dict[str, Any]) -> None:
    enc = AflocEncoder(AflocConfig(afloc_assets["ckpt"], afloc_assets["text_dir"]))
    digest = hashlib.sha256(afloc_assets["ckpt"].read_bytes()).hexdigest()
    info = enc.model_info()
    assert info.sha256 == digest and info.model_id == f"afloc-{digest[:12]}"
    m = enc.manifest()
    assert m["vocab_sha256"] == hashlib.sha256((afloc_assets["text_dir"] / "vocab.txt").read_bytes()).hexdigest()
    assert len(m["weights_sha256"]) == 64 and m["prompt_set"]["version"] == "afloc-cxr-1"
    with pytest.raises(ModelError) as err:
        AflocEncoder(AflocConfig(afloc_assets["ckpt"], afloc_assets["text_dir"], expected_sha256="0" * 64))
    assert err.value.code == "model_hash_mismatch"


def _write(tmp_path: Path, data: bytes, name: str = "x.ckpt") -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_missing_and_unexpected_keys_refused(afloc_assets: dict[str, Any], tmp_path: Path) -> None:
    sd = published_state_dict(afloc_assets["model"])
    del sd["afloc.img_encoder.local2_embedder.weight"]
    ckpt = read_checkpoint(_write(tmp_path, envelope(sd)))
    with pytest.raises(ModelError, match=r"1 missing.*local2_embedder") as err:
        load_strict(build_model(afloc_assets["text_dir"]), ckpt.state_dict)
    assert err.value.code == "checkpoint_layout"
    sd = published_state_dict(afloc_assets["model"])
    sd["afloc.img_encoder.local_f_embedder.weight"] = torch.zeros(2, 2)  # use_ce_loss variant: not the published one
    ckpt = read_checkpoint(_write(tmp_path, envelope(sd), "y.ckpt"))
    with pytest.raises(ModelError, match=r"1 unexpected.*local_f_embedder"):
        load_strict(build_model(afloc_assets["text_dir"]), ckpt.state_dict)


def test_layout_errors_refused_with_reason(afloc_assets: dict[str, Any], tmp_path: Path) -> None:
    sd = {k.removeprefix("afloc."): v for k, v in published_state_dict(afloc_assets["model"]).items()}
    with pytest.raises(ModelError, match=r"lacks the 'afloc\.' prefix"):
        read_checkpoint(_write(tmp_path, envelope(sd)))
    sd = published_state_dict(afloc_assets["model"])
    sd["afloc.text_encoder.model.embeddings.position_ids"] = torch.arange(128).flip(0).reshape(1, -1)
    with pytest.raises(ModelError, match="position_ids are not"):
        read_checkpoint(_write(tmp_path, envelope(sd), "p.ckpt"))
    cfg = {**CONFIG, "data": {"text": {"word_num": 64}}}
    with pytest.raises(ModelError, match="word_num=64"):
        read_checkpoint(_write(tmp_path, envelope(published_state_dict(afloc_assets["model"]), config=cfg), "w.ckpt"))
    # A weights-only state dict without the Lightning envelope is not the published format.
    buf = io.BytesIO()
    torch.save({"a": torch.zeros(1)}, buf)
    with pytest.raises(ModelError, match="not a Lightning checkpoint"):
        read_checkpoint(_write(tmp_path, buf.getvalue(), "plain.ckpt"))
    with pytest.raises(ModelError, match="not a torch zip"):
        read_checkpoint(_write(tmp_path, pickle.dumps({"state_dict": {}}), "legacy.ckpt"))


class _Evil:
    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self) -> tuple[Any, ...]:
        if self.how == "system":
            return (os.system, (f"touch {self.marker}",))
        if self.how == "exec":
            return (exec, (f"open({str(self.marker)!r}, 'w').write('x')",))
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("how", ["system", "exec", "touch"])
def test_malicious_pickle_refused_and_nothing_executes(afloc_assets: dict[str, Any], tmp_path: Path, how: str) -> None:
    marker = tmp_path / f"pwned-{how}"
    data = envelope(published_state_dict(afloc_assets["model"]), extra_hp=_Evil(marker, how))
    # Sanity: the payload is really in the pickle stream.
    with zipfile.ZipFile(io.BytesIO(data)) as z:
        pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
        assert b"touch" in z.read(pkl) or b"open(" in z.read(pkl)
    with pytest.raises(ModelError) as err:
        read_checkpoint(_write(tmp_path, data))
    assert err.value.code == "checkpoint_unsafe"
    assert {"system": "system", "exec": "exec", "touch": "getattr"}[how] in str(err.value)  # the global it names
    assert not marker.exists()
    with pytest.raises(ModelError):
        AflocEncoder(AflocConfig(tmp_path / "x.ckpt", afloc_assets["text_dir"]))
    assert not marker.exists()


def test_envelope_pickled_by_real_omegaconf_2_0_5() -> None:
    """A checkpoint whose ``hyper_parameters`` were pickled by the real OmegaConf 2.0.5 (``data/omegaconf205_envelope.ckpt``).

    Made once with ``pip install --target`` of omegaconf 2.0.5 (not a Locus dependency):
    ``OmegaConf.create({...})`` as ``hyper_parameters``, a ``ModelCheckpoint`` class key under the
    Lightning module name, ``torch.save(..., pickle_protocol=2)``.  The reader recovers the config
    as plain data without OmegaConf, and the globals it met are exactly the allow-list's placeholders.
    """
    ckpt = read_checkpoint(Path(__file__).parent / "data" / "omegaconf205_envelope.ckpt")
    assert ckpt.hyper_parameters == {
        "phase": "pretrain",
        "model": {"afloc": {"temp1": 4.0}, "text": {"bert_type": "x", "last_n_layers": 4}},
        "data": {"text": {"word_num": 97}, "image": {"imsize": 256}},
        "lightning": {"trainer": {"gpus": [0, 1]}},
    }
    assert set(ckpt.placeholders) == {
        "collections.defaultdict", "omegaconf.base.ContainerMetadata", "omegaconf.base.Metadata",
        "omegaconf.dictconfig.DictConfig", "omegaconf.listconfig.ListConfig", "omegaconf.nodes.AnyNode",
        "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint", "typing.Any",
    }  # fmt: skip
    assert torch.equal(ckpt.state_dict["img_encoder.global_embedder.bias"], torch.arange(4.0))
