"""Device profiles: the four bundled ones load; every kind of bad field is named."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from edge_agent.config import PROFILE_DIR, load_profile, parse_profile, profile_path
from edge_agent.errors import ConfigError

NAMES = ["jetson-orin-nano", "jetson-agx-orin", "x86-cpu", "x86-nvidia-gpu"]


@pytest.mark.parametrize("name", NAMES)
def test_bundled_profiles_load(name, tmp_path):
    p = load_profile(profile_path(name), base_dir=tmp_path)
    assert p.name == name and p.device.id.startswith(name)
    assert p.spool.dir == tmp_path / "spool" and p.deid.secret_path == tmp_path / "keys/site.secret"
    assert set(p.preprocess) == {"CT", "MR", "CR", "DX", "MG", "US"}
    assert p.preprocess["CR"].interpolation == "bicubic" and p.preprocess["CT"].interpolation == "bilinear"
    assert p.inference.execution_providers[-1] == "CPUExecutionProvider"
    assert p.mqtt.tls is not None and p.outbox.max_count > 0 and p.records.path.name == "records.sqlite"
    assert 1 <= len(p.dicom.ae_title) <= 16 and not p.dicom.accepts_any_caller


def test_gpu_profiles_prefer_tensorrt_and_cpu_profile_has_cpu_only():
    assert load_profile(profile_path("jetson-orin-nano")).inference.execution_providers[0] == "TensorrtExecutionProvider"
    assert load_profile(profile_path("x86-cpu")).inference.execution_providers == ("CPUExecutionProvider",)


def test_each_profile_asks_for_the_precision_its_hardware_runs_best():
    assert load_profile(profile_path("jetson-orin-nano")).inference.precision == "int8"
    assert load_profile(profile_path("x86-cpu")).inference.precision == "fp32"


def test_no_profile_holds_a_secret():
    for path in PROFILE_DIR.glob("*.toml"):
        text = path.read_text().lower()
        assert "-----begin" not in text and "password" not in text


def _raw(name="x86-cpu") -> dict:
    return tomllib.loads(profile_path(name).read_text())


@pytest.mark.parametrize("mutate, message", [
    (lambda r: r.pop("dicom"), r"section \[dicom\] missing"),
    (lambda r: r["dicom"].pop("ae_title"), r"\[dicom\] ae_title: missing"),
    (lambda r: r["dicom"].update(port="eleven"), r"\[dicom\] port: expected an integer"),
    (lambda r: r["dicom"].update(port=70000), r"\[dicom\] port: must be in"),
    (lambda r: r["dicom"].update(ae_title="THIS_TITLE_IS_TOO_LONG"), r"AE title must be 1-16"),
    (lambda r: r["dicom"].update(allowed_calling_aets=[]), r"allowed_calling_aets: needs at least 1"),
    (lambda r: r["dicom"].update(colour="blue"), r"\[dicom\] unknown key\(s\): colour"),
    (lambda r: r.update(extra={}), r"unknown section\(s\): extra"),
    (lambda r: r["deid"]["burned_in"].update(policy="ignore"), r"policy: must be one of quarantine, blank"),
    (lambda r: r["deid"]["burned_in"].update(policy="blank", detect_text=False),
     r"policy 'blank' without detect_text needs at least one region"),
    (lambda r: r["deid"]["burned_in"].update(regions=[[0, 0, 10]]), r"regions\[0\]: expected \[x, y, width"),
    (lambda r: r["deid"]["options"].update(retain_patient_characteristics="yes"), r"expected true or false"),
    (lambda r: r["deid"]["options"].update(safe_private=["GEMS_PARM_01"]), r"safe_private\[0\]: expected 'CREATOR:0xEE'"),
    (lambda r: r["deid"]["options"].update(safe_private=["GEMS:0x1FF"]), r"safe_private\[0\]: expected"),
    (lambda r: r["deid"].update(mode="deny-list"), r"mode: must be one of allow-list, keep-unlisted"),
    (lambda r: r["deid"].update(documents="forward"), r"documents: must be one of quarantine, dummy"),
    (lambda r: r["preprocess"].update(PET={}), r"\[preprocess.PET\] unknown modality"),
    (lambda r: r["preprocess"]["CT"].update(window=[100, -100]), r"window: expected \[low, high\]"),
    (lambda r: r["preprocess"]["CT"].update(interpolation="lanczos"), r"interpolation: must be one of"),
    (lambda r: r["inference"].update(execution_providers=["MagicProvider"]), r"unknown provider 'MagicProvider'"),
    (lambda r: r["inference"].update(precision="fp8"), r"precision: must be one of"),
    (lambda r: r["mqtt"]["tls"].pop("ca"), r"\[mqtt.tls\] ca: missing"),
    (lambda r: r["outbox"].update(max_count=0), r"\[outbox\] max_count: must be in"),
    (lambda r: r["spool"].update(max_bytes=True), r"\[spool\] max_bytes: expected an integer"),
])
def test_bad_fields_are_named(mutate, message):
    raw = _raw()
    mutate(raw)
    with pytest.raises(ConfigError, match=message):
        parse_profile(raw, name="x86-cpu")


def test_blank_policy_with_regions_and_any_caller(tmp_path):
    raw = _raw()
    raw["deid"]["burned_in"].update(policy="blank", regions=[[0, 0, 320, 40]])
    raw["dicom"]["allowed_calling_aets"] = ["*"]
    p = parse_profile(raw, base_dir=tmp_path)
    assert p.deid.burned_in.action == "blank" and p.deid.burned_in.regions[0].width == 320
    assert p.dicom.accepts_any_caller


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="profile not found"):
        load_profile(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[dicom\nport = 1")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_profile(bad)


def test_absolute_paths_are_kept(tmp_path):
    raw = _raw()
    raw["spool"]["dir"] = "/var/lib/medchain/spool"
    assert parse_profile(raw, base_dir=tmp_path).spool.dir == Path("/var/lib/medchain/spool")


def test_deid_options_and_modes(tmp_path):
    p = load_profile(profile_path("x86-cpu"), base_dir=tmp_path)
    assert p.deid.mode == "allow-list" and p.deid.documents == "quarantine"
    assert not p.deid.clean_descriptors and p.deid.safe_private == frozenset()
    raw = _raw()
    raw["deid"]["options"].update(clean_descriptors=True, safe_private=["GEMS_ACQU_01:0x8B", " SIEMENS MED :10"])
    raw["deid"].update(mode="keep-unlisted", documents="dummy")
    p = parse_profile(raw, base_dir=tmp_path)
    assert p.deid.clean_descriptors and p.deid.mode == "keep-unlisted" and p.deid.documents == "dummy"
    assert p.deid.safe_private == {("GEMS_ACQU_01", 0x8B), ("SIEMENS MED", 0x10)}
