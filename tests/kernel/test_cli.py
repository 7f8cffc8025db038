"""`dmrepl doctor` and `dmrepl ls` against the real kernel (kernel tier)."""

import json

from dmrepl import cli
from dmrepl.kernel.tables import Linear

MiB = 1 << 20


def test_doctor_passes_in_the_vm(capsys):
    rc = cli.main(["doctor", "--json"])
    out = json.loads(capsys.readouterr().out)
    verdicts = {c["name"]: c["verdict"] for c in out["checks"]}
    assert verdicts == {name: "ok" for name in verdicts}, out
    assert rc == 0 and out["ok"] is True
    for name in ("root", "device-mapper", "target snapshot", "target snapshot-origin", "target snapshot-merge",
                 "target era", "target mirror", "loop", "nbd", "era_invalidate", "nbdkit"):
        assert name in verdicts


def test_ls_lists_only_dmrepl_devices(ctl, loops, devices, capsys):
    disk = loops.make("d", 4 * MiB)
    ours = devices.create("ls", [Linear(0, 4 * 2048, disk, 0)])
    ctl.create("not-ours", "SOMEONE-ELSE-1")
    try:
        assert cli.main(["ls", "--json"]) == 0
        rows = json.loads(capsys.readouterr().out)
        assert [(r["name"], r["targets"], r["suspended"]) for r in rows] == [(ours, ["linear"], False)]
        assert cli.main(["ls"]) == 0
        text = capsys.readouterr().out
        assert ours in text and "not-ours" not in text
    finally:
        ctl.remove("not-ours")
