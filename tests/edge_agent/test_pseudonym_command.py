"""`medchain edge pseudonym`: the registrar's MRN lookup at the site. The token it prints is
the one the edge writes into that patient's de-identified images (same secret, same issuer
rule), so consent can be filed on the ledger by token without the MRN leaving the site."""

from __future__ import annotations

import io
import json

from edge_agent.config import load_profile, profile_path
from edge_agent.deid import deidentify
from edge_agent.processor import Processor
from medchain.identity import load_secret
from medchain_app.cli import main
from scanner_sim.studies import generate_studies

CONFIG = "firmware_configs/x86-cpu.toml"


def test_the_printed_token_is_the_one_the_edge_writes(tmp_path, capsys, monkeypatch):
    assert main(["keys", "new", "secret", str(tmp_path / "keys" / "site.secret")]) == 0
    profile = load_profile(profile_path("x86-cpu"), base_dir=tmp_path)
    processor = Processor.from_config(profile.deid, load_secret(tmp_path / "keys" / "site.secret"))
    studies = generate_studies("CR", 2, seed=3)
    written = []
    for st in studies:  # the edge's own de-identification of each patient's first image
        out, report = deidentify(st.datasets[0], processor.pseudonymizer, processor.options)
        assert out.PatientID == report.patient_token
        written.append(out.PatientID)
    assert written[0] != written[1]
    capsys.readouterr()
    st = studies[0]
    common = ["edge", "pseudonym", "--config", CONFIG, "--state-dir", str(tmp_path)]
    assert main([*common, "--mrn", st.patient.patient_id, "--issuer", st.patient.issuer]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line) == {"patient": written[0], "issuer": st.patient.issuer}
    assert st.patient.patient_id not in line  # the MRN is not repeated
    # the issuer defaults to the profile's, as for an image without Issuer of Patient ID
    assert main([*common, "--mrn", st.patient.patient_id]) == 0
    [line] = capsys.readouterr().out.splitlines()
    assert json.loads(line)["issuer"] == profile.deid.patient_id_issuer
    assert (json.loads(line)["patient"] == written[0]) is (st.patient.issuer == profile.deid.patient_id_issuer)
    # many at once from standard input, in order; DICOM padding is not part of an MRN
    monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{s.patient.patient_id} \n" for s in studies)))
    assert main([*common, "--mrn", "-", "--issuer", studies[0].patient.issuer]) == 0
    assert [json.loads(x)["patient"] for x in capsys.readouterr().out.splitlines()] == written


def test_another_sites_secret_gives_another_token_and_no_secret_is_a_clear_error(tmp_path, capsys):
    st = generate_studies("CR", 1, seed=3)[0]
    tokens = []
    for site in ("a", "b"):
        assert main(["keys", "new", "secret", str(tmp_path / site / "keys" / "site.secret")]) == 0
        capsys.readouterr()
        assert main(["edge", "pseudonym", "--config", CONFIG, "--state-dir", str(tmp_path / site),
                     "--mrn", st.patient.patient_id]) == 0
        tokens.append(json.loads(capsys.readouterr().out)["patient"])
    assert tokens[0] != tokens[1]
    assert main(["edge", "pseudonym", "--config", CONFIG, "--state-dir", str(tmp_path / "none"),
                 "--mrn", st.patient.patient_id]) == 2
    assert "medchain keys new secret" in capsys.readouterr().err
