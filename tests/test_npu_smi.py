"""npu-smi parsing: the verbatim 910B sample of ascend-facts.md and each documented variant.

Only ``SAMPLE_910B`` is verbatim; the others are constructed from the variant
descriptions in ascend-facts.md (five-digit memory with no space before ``/``, idle
card, A3 two-chip rows with ``Chip  Phy-ID`` and ``-`` power, 310P without HBM column
under ``Chip    Device``, Ascend 950 ``| NPU ID | Name`` with ``NPU Util(%)``).
"""
import importlib.machinery
import os
import stat
import subprocess
import sys
import types

import pytest

from lvsa import npu_smi
from lvsa.npu_smi import parse_info, parse_usages, query, query_summary

SAMPLE_910B = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.rc3.3              Version: 23.0.rc3.3                                           |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B1               | OK            | 271.1       41                0    / 0             |
| 0                         | 0000:C1:00.0  | 55          0    / 0          65099/ 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 0       0                 | 576489        | python                   | 60703                   |
+===========================+===============+====================================================+
"""

# two 910B3 cards: five-digit used figures (no space before "/") next to four-digit ones,
# two processes on one card, the other idle
SAMPLE_910B_FIVE_DIGIT = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 24.1.rc2                 Version: 24.1.rc2                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B3               | OK            | 318.6       52                15360/ 15360         |
| 0                         | 0000:C1:00.0  | 97          0    / 0          62811/ 65536         |
+===========================+===============+====================================================+
| 1     910B3               | Warning       | 93.4        38                0    / 0             |
| 0                         | 0000:01:00.0  | 0           0    / 0          3375 / 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 0       0                 | 1203344       | python3                  | 58112                   |
| 0       0                 | 1203391       | python3                  | 1024                    |
+===========================+===============+====================================================+
| No running processes found in NPU 1                                                            |
+===========================+===============+====================================================+
"""

SAMPLE_910B_IDLE = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 23.0.6                   Version: 23.0.6                                               |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip                      | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     910B4               | OK            | 88.0        35                0    / 0             |
| 0                         | 0000:81:00.0  | 0           0    / 0          2907 / 32768         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| No running processes found in NPU 0                                                            |
+===========================+===============+====================================================+
"""

# Atlas A3: an NPU row and a chip row per chip, two chips per NPU; the second chip's
# power is "-"; the chip header adds Phy-ID
SAMPLE_A3 = """\
+------------------------------------------------------------------------------------------------+
| npu-smi 24.1.rc3                 Version: 24.1.rc3                                             |
+---------------------------+---------------+----------------------------------------------------+
| NPU   Name                | Health        | Power(W)    Temp(C)           Hugepages-Usage(page)|
| Chip  Phy-ID              | Bus-Id        | AICore(%)   Memory-Usage(MB)  HBM-Usage(MB)        |
+===========================+===============+====================================================+
| 0     Ascend910           | OK            | 381.5       44                0    / 0             |
| 0     0                   | 0000:9D:00.0  | 76          0    / 0          60122/ 65536         |
+---------------------------+---------------+----------------------------------------------------+
| 0     Ascend910           | OK            | -           46                0    / 0             |
| 1     1                   | 0000:9F:00.0  | 70          0    / 0          59870/ 65536         |
+===========================+===============+====================================================+
| 1     Ascend910           | OK            | 162.0       37                0    / 0             |
| 0     2                   | 0000:99:00.0  | 0           0    / 0          3402 / 65536         |
+---------------------------+---------------+----------------------------------------------------+
| 1     Ascend910           | OK            | -           36                0    / 0             |
| 1     3                   | 0000:9B:00.0  | 0           0    / 0          3170 / 65536         |
+===========================+===============+====================================================+
+---------------------------+---------------+----------------------------------------------------+
| NPU     Chip              | Process id    | Process name             | Process memory(MB)      |
+===========================+===============+====================================================+
| 0       0                 | 220154        | python                   | 56612                   |
| 0       1                 | 220155        | python                   | 56360                   |
+===========================+===============+====================================================+
| No running processes found in NPU 1                                                            |
+===========================+===============+====================================================+
"""

# 310P: device memory only (no HBM column), "Chip    Device" header, power "NA";
# NPU 2 is a Duo card (two chips, NPU row repeated)
SAMPLE_310P = """\
+--------------------------------------------------------------------------------------------------------+
| npu-smi 23.0.0                                   Version: 23.0.0                                       |
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Name                  | Health          | Power(W)     Temp(C)           Hugepages-Usage(page) |
| Chip    Device                | Bus-Id          | AICore(%)    Memory-Usage(MB)                        |
+===============================+=================+======================================================+
| 1       310P3                 | OK              | NA           54                0     / 0             |
| 0       0                     | 0000:61:00.0    | 12           1417 / 44280                            |
+===============================+=================+======================================================+
| 2       310P3                 | OK              | NA           49                0     / 0             |
| 0       1                     | 0000:82:00.0    | 0            1659 / 21527                            |
+-------------------------------+-----------------+------------------------------------------------------+
| 2       310P3                 | Alarm           | NA           51                0     / 0             |
| 1       2                     | 0000:82:00.0    | 4            11452/ 21527                            |
+===============================+=================+======================================================+
+-------------------------------+-----------------+------------------------------------------------------+
| NPU     Chip                  | Process id      | Process name             | Process memory(MB)      |
+===============================+=================+======================================================+
| No running processes found in NPU 1                                                                    |
+===============================+=================+======================================================+
| 2       1                     | 30917           | infer_server             | 9812                    |
+===============================+=================+======================================================+
"""

# Ascend 950: one header line of single-title cells, "NPU Util(%)"
SAMPLE_950 = """\
+---------------------------------------------------------------------------------------------------------+
| npu-smi 25.5.0                                        Version: 25.5.0                                   |
+--------+----------------+---------+----------+---------+-------------+--------------------+-------------+
| NPU ID | Name           | Health  | Power(W) | Temp(C) | NPU Util(%) | HBM-Usage(MB)      | Bus-Id      |
+========+================+=========+==========+=========+=============+====================+=============+
| 0      | Ascend950PR    | OK      | 402.7    | 52      | 87          | 118734/ 131072     | 0000:C1:00.0|
+--------+----------------+---------+----------+---------+-------------+--------------------+-------------+
| 1      | Ascend950PR    | OK      | 96.3     | 38      | 0           | 2861 / 131072      | 0000:C2:00.0|
+========+================+=========+==========+=========+=============+====================+=============+
+--------+----------+---------------+------------------------------+--------------------------------------+
| NPU ID | Chip ID  | Process ID    | Process Name                 | Process Memory(MB)                   |
+========+==========+===============+==============================+======================================+
| 0      | 0        | 812345        | python3 -m lvsa.bench        | 115872                               |
+--------+----------+---------------+------------------------------+--------------------------------------+
| No running processes found in NPU 1                                                                     |
+========+==========+===============+==============================+======================================+
"""

USAGES_910B = """\
        NPU ID                         : 0
        Chip Count                     : 1

        DDR Capacity(MB)               : 0
        DDR Usage Rate(%)              : 0
        DDR Hugepages Total(page)      : 0
        DDR Hugepages Usage Rate(%)    : 0
        HBM Capacity(MB)               : 65536
        HBM Usage Rate(%)              : 5
        Aicore Usage Rate(%)           : 0
        Aivector Usage Rate(%)         : 0
        Aicpu Usage Rate(%)            : 0
        Ctrlcpu Usage Rate(%)          : 2
        DDR Bandwidth Usage Rate(%)    : 0
        HBM Bandwidth Usage Rate(%)    : 0
        NPU Utilization(%)             : 0
        Chip ID                        : 0
"""

USAGES_A3 = """\
        NPU ID                         : 3
        Chip Count                     : 2

        HBM Capacity(MB)               : 65536
        HBM Usage Rate(%)              : 92
        Aicore Usage Rate(%)           : 76
        NPU Utilization(%)             : 81
        Chip ID                        : 0

        HBM Capacity(MB)               : 65536
        HBM Usage Rate(%)              : 91
        Aicore Usage Rate(%)           : 70
        NPU Utilization(%)             : 74
        Chip ID                        : 1
"""


def test_910b_verbatim_sample():
    info = parse_info(SAMPLE_910B)
    assert info.version == "23.0.rc3.3"
    assert [n.npu_id for n in info.npus] == [0]
    n = info.npu(0)
    assert n.name == "910B1" and n.health == "OK"
    assert n.power_w == pytest.approx(271.1) and n.temp_c == 41
    assert n.aicore_percent == 55
    assert (n.hbm_used_mb, n.hbm_total_mb) == (65099, 65536)
    assert (n.memory_used_mb, n.memory_total_mb) == (65099, 65536)  # HBM wins over DDR 0/0
    (c,) = n.chips
    assert (c.chip_id, c.bus_id, c.memory_used_mb, c.memory_total_mb) == (0, "0000:C1:00.0", 0, 0)
    assert (c.hugepages_used, c.hugepages_total) == (0, 0)
    (p,) = n.processes
    assert (p.npu_id, p.chip_id, p.pid, p.name, p.memory_mb) == (0, 0, 576489, "python", 60703)
    assert not n.idle
    assert info.util_label == "AICore(%)"
    assert info.lines()[1] == ("npu:0 910B1 (1 chip) health=OK power=271.1W temp=41C AICore=55% "
                               "HBM 65099/65536 MB processes=1")


def test_five_digit_memory_and_two_cards():
    info = parse_info(SAMPLE_910B_FIVE_DIGIT)
    a, b = info.npus
    assert (a.npu_id, a.name, a.hbm_used_mb, a.hbm_total_mb) == (0, "910B3", 62811, 65536)
    assert (a.chips[0].hugepages_used, a.chips[0].hugepages_total) == (15360, 15360)
    assert a.power_w == pytest.approx(318.6) and a.aicore_percent == 97
    assert [(p.pid, p.memory_mb) for p in a.processes] == [(1203344, 58112), (1203391, 1024)]
    assert (b.npu_id, b.hbm_used_mb, b.hbm_total_mb, b.health) == (1, 3375, 65536, "Warning")
    assert b.processes == () and b.idle
    assert not a.idle


def test_idle_card():
    (n,) = parse_info(SAMPLE_910B_IDLE).npus
    assert (n.name, n.hbm_used_mb, n.hbm_total_mb, n.aicore_percent) == ("910B4", 2907, 32768, 0)
    assert n.idle and n.processes == ()


def test_a3_two_chip_rows():
    info = parse_info(SAMPLE_A3)
    assert [n.npu_id for n in info.npus] == [0, 1]
    n0, n1 = info.npus
    assert n0.name == "Ascend910" and len(n0.chips) == 2
    assert [c.chip_id for c in n0.chips] == [0, 1]
    assert [c.phy_id for c in n0.chips] + [c.phy_id for c in n1.chips] == [0, 1, 2, 3]
    assert n0.chips[1].power_w is None  # printed "-"
    assert n0.power_w == pytest.approx(381.5)  # the "-" is not a zero, nor counted twice
    assert n0.temp_c == 46  # hottest chip
    assert n0.aicore_percent == pytest.approx(73.0)
    assert (n0.hbm_used_mb, n0.hbm_total_mb) == (60122 + 59870, 2 * 65536)
    assert [c.bus_id for c in n1.chips] == ["0000:99:00.0", "0000:9B:00.0"]
    assert [(p.chip_id, p.pid) for p in n0.processes] == [(0, 220154), (1, 220155)]
    assert n1.idle and n1.power_w == pytest.approx(162.0)


def test_chip_rows_without_repeated_npu_row():
    # a driver that prints one NPU row followed by both chip rows: power is counted once
    lines = SAMPLE_A3.splitlines()
    i = lines.index("| 0     Ascend910           | OK            | -           46                0    / 0             |")
    text = "\n".join(lines[:i - 1] + lines[i + 1:])
    n0 = parse_info(text).npu(0)
    assert [c.chip_id for c in n0.chips] == [0, 1]
    assert n0.power_w == pytest.approx(381.5)
    assert (n0.hbm_used_mb, n0.hbm_total_mb) == (60122 + 59870, 2 * 65536)


def test_310p_without_hbm():
    info = parse_info(SAMPLE_310P)
    a, b = info.npus
    assert (a.npu_id, a.name, b.npu_id) == (1, "310P3", 2)
    assert a.hbm_used_mb is None and a.hbm_total_mb is None
    assert (a.memory_used_mb, a.memory_total_mb) == (1417, 44280)
    assert a.power_w is None  # "NA"
    assert a.temp_c == 54 and a.aicore_percent == 12
    assert a.chips[0].phy_id == 0 and a.idle
    assert len(b.chips) == 2 and [c.phy_id for c in b.chips] == [1, 2]
    assert (b.memory_used_mb, b.memory_total_mb) == (1659 + 11452, 2 * 21527)
    assert b.health == "Alarm"  # the worse chip decides
    assert [(p.chip_id, p.pid, p.name, p.memory_mb) for p in b.processes] == [(1, 30917, "infer_server", 9812)]
    assert "memory 13111/43054 MB" in info.lines()[2]


def test_ascend_950_header():
    info = parse_info(SAMPLE_950)
    assert info.version == "25.5.0" and info.util_label == "NPU Util(%)"
    a, b = info.npus
    assert (a.npu_id, a.name, a.health) == (0, "Ascend950PR", "OK")
    assert a.power_w == pytest.approx(402.7) and a.temp_c == 52
    assert a.aicore_percent == 87
    assert (a.hbm_used_mb, a.hbm_total_mb) == (118734, 131072)
    assert a.chips[0].bus_id == "0000:C1:00.0"
    (p,) = a.processes
    assert (p.pid, p.name, p.memory_mb) == (812345, "python3 -m lvsa.bench", 115872)
    assert (b.hbm_used_mb, b.aicore_percent) == (2861, 0) and b.idle
    assert "NPU Util=87%" in info.lines()[1]


def test_usages_blocks():
    (u,) = parse_usages(USAGES_910B)
    assert (u.npu_id, u.chip_id, u.hbm_capacity_mb, u.hbm_usage_percent, u.aicore_percent,
            u.npu_util_percent) == (0, 0, 65536, 5, 0, 0)
    assert u.fields["Ctrlcpu Usage Rate(%)"] == 2
    a, b = parse_usages(USAGES_A3)
    assert (a.npu_id, a.chip_id, a.hbm_usage_percent, a.aicore_percent) == (3, 0, 92, 76)
    assert (b.npu_id, b.chip_id, b.hbm_usage_percent, b.npu_util_percent) == (3, 1, 91, 74)


@pytest.mark.parametrize("bad", ["", "npu-smi: command output garbled\n", "+----+\n| x | y |\n"])
def test_unparseable_output_raises_valueerror(bad):
    with pytest.raises(ValueError):
        parse_info(bad)
    with pytest.raises(ValueError):
        parse_usages(bad.replace(":", ""))


def test_to_dict_carries_aggregates():
    d = parse_info(SAMPLE_A3).to_dict()
    assert d["npus"][0]["hbm_used_mb"] == 60122 + 59870
    assert d["npus"][0]["power_w"] == pytest.approx(381.5)
    assert d["version"] == "24.1.rc3"


# ------------------------------------------------------------------ query()
def _fake_npu_smi(tmp_path, script: str):
    exe = tmp_path / "npu-smi"
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    return str(exe)


def test_query_missing_binary_is_a_reason(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory
    r = query()
    assert isinstance(r, str) and "npu-smi not found on PATH" in r


def test_query_failing_binary_is_a_reason(tmp_path):
    exe = _fake_npu_smi(tmp_path, "echo 'dcmi module initialize failed. ret is -8005' >&2\nexit 3\n")
    r = query(binary=exe)
    assert isinstance(r, str)
    assert "exited with status 3" in r and "dcmi module initialize failed" in r


def test_query_garbage_output_is_a_reason(tmp_path):
    exe = _fake_npu_smi(tmp_path, "echo 'Permission denied, please run as root'\n")
    r = query(binary=exe)
    assert isinstance(r, str) and "could not read" in r and "Permission denied" in r


def test_query_timeout_is_a_reason(tmp_path):
    exe = _fake_npu_smi(tmp_path, "sleep 5\n")
    r = query(binary=exe, timeout=0.2)
    assert isinstance(r, str) and "timed out" in r


def test_query_runs_info_and_usages(tmp_path):
    (tmp_path / "info.txt").write_text(SAMPLE_910B_FIVE_DIGIT)
    (tmp_path / "usage0.txt").write_text(USAGES_910B)
    exe = _fake_npu_smi(tmp_path, f"""
if [ "$#" -eq 1 ] && [ "$1" = info ]; then cat {tmp_path}/info.txt; exit 0; fi
if [ "$2" = "-t" ] && [ "$3" = usages ] && [ "$5" = 0 ]; then cat {tmp_path}/usage0.txt; exit 0; fi
echo "Error: no such card $5" >&2; exit 2
""")
    info = query(binary=exe)
    assert isinstance(info, npu_smi.SmiInfo) and [n.npu_id for n in info.npus] == [0, 1]
    assert info.npus[0].usages == ()
    info = query(usages=True, binary=exe)
    assert info.npus[0].usages[0].hbm_capacity_mb == 65536
    assert info.npus[1].usages == ()
    assert "no such card 1" in info.usage_errors[1]


def test_query_never_raises(monkeypatch):
    def boom(*a, **k):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(npu_smi.shutil, "which", lambda b: "/usr/local/sbin/npu-smi")
    monkeypatch.setattr(subprocess, "run", boom)
    r = query()
    assert isinstance(r, str) and "RuntimeError: unexpected" in r


def test_query_oserror_is_a_reason(monkeypatch):
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", "/usr/local/sbin/npu-smi")

    monkeypatch.setattr(npu_smi.shutil, "which", lambda b: "/usr/local/sbin/npu-smi")
    monkeypatch.setattr(subprocess, "run", denied)
    r = query()
    assert isinstance(r, str) and r.startswith("could not run `npu-smi info`") and "Permission denied" in r


def test_query_summary_for_lvsa_info(monkeypatch, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    path = os.environ.get("PATH", "")
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.delitem(sys.modules, "torch_npu", raising=False)
    assert query_summary() is None  # neither npu-smi nor torch_npu: not an Ascend host
    fake = types.ModuleType("torch_npu")
    fake.__spec__ = importlib.machinery.ModuleSpec("torch_npu", None)
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    assert "npu-smi not found on PATH" in query_summary()  # torch_npu but no npu-smi: say so
    monkeypatch.setenv("PATH", path)
    (tmp_path / "info.txt").write_text(SAMPLE_910B_FIVE_DIGIT)
    exe = _fake_npu_smi(tmp_path, f"cat {tmp_path}/info.txt\n")
    assert query_summary(binary=exe).splitlines() == [
        "npu-smi 24.1.rc2",
        "  npu:0 910B3 (1 chip) health=OK power=318.6W temp=52C AICore=97% HBM 62811/65536 MB processes=2",
        "  npu:1 910B3 (1 chip) health=Warning power=93.4W temp=38C AICore=0% HBM 3375/65536 MB processes=0",
    ]
