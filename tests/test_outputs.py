"""Variables coming back from a container (``-o VAR``, ``outputs=``) are data, never code.

Code in the container can write any bytes where the values go; the host must read them
without running anything they name (issue 17 §5). The attacks here would run code on the
host if the host unpickled what came back.
"""
from __future__ import annotations

import io
import os
import pickle
import struct
from typing import Any

import pytest

import pynsbook
from pynsbook.engine import values

_NEEDS = pytest.mark.needs("userns") if os.geteuid() else pytest.mark.needs("root")


def CONTAINER(test: Any) -> Any:
    """A test that runs containers, and must leave nothing of them behind."""
    return pytest.mark.usefixtures("no_leaks")(_NEEDS(test))


# code run in the container: find the outputs memfd the client passed, as an attacker would
FIND_OUTPUTS_FD = """
import os
fd = next(int(f) for f in os.listdir('/proc/self/fd')
          if 'pynsbook-outputs' in (os.path.exists('/proc/self/fd/' + f)
                                    and os.readlink('/proc/self/fd/' + f) or ''))
"""


class _MakesMarker:
    """Unpickling this creates a directory: proof that the host ran code it was sent."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (os.mkdir, (self.path,))


def _evil_pickle(marker: str) -> bytes:
    return pickle.dumps({"values": {"x": _MakesMarker(marker)}, "problems": {}})


def _npy(header: str, data: bytes = b"") -> bytes:
    """A version 1.0 .npy file with any header at all (NumPy would not write a bad one)."""
    raw = header.encode("latin1")
    raw += b" " * (63 - (10 + len(raw)) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(raw)) + raw + data


def _tagged(tag: bytes, body: bytes) -> bytes:
    return tag + struct.pack(">Q", len(body)) + body


def _frame(*entries: bytes) -> bytes:
    return values.MAGIC + struct.pack(">I", len(entries)) + b"".join(entries)


def _entry(kind: bytes, name: str, body: bytes) -> bytes:
    return kind + struct.pack(">I", len(name)) + name.encode() + struct.pack(">Q", len(body)) + body


def _one_line(text: str) -> str:
    assert text and "\n" not in text and "Traceback" not in text
    return text


# ---------------------------------------------------------------------------------------
# through a real container

@CONTAINER
def test_nested_plain_values_and_numpy_arrays_come_back():
    np = pytest.importorskip("numpy")
    r = pynsbook.run(
        "import numpy as np\n"
        "plain = {'ints': [0, -1, 2**100], 'float': 2.5, 'nan': float('nan'), 'c': 1-2j,\n"
        "         'text': 'héllo', 'raw': b'\\x00\\xff', 'ba': bytearray(b'ab'), 'none': None,\n"
        "         'flags': (True, False), (1, 'k'): {1, 2}, 'fs': frozenset({'a'}),\n"
        "         'deep': [[[[{'x': ()}]]]]}\n"
        "grid = np.arange(12, dtype=np.int32).reshape(3, 4)\n"
        "fgrid = np.asfortranarray(np.linspace(0, 1, 6).reshape(2, 3))\n"
        "names = np.array(['ab', 'c'])\n"
        "days = np.array(['2024-01-01', '2024-02-29'], dtype='datetime64[D]')\n"
        "mask = grid > 5\n"
        "total = grid.sum()\n",
        outputs=["plain", "grid", "fgrid", "names", "days", "mask", "total"])
    assert r.exit_code == 0, r.stderr
    assert r.output_errors == {}
    plain = r.outputs["plain"]
    nan = plain.pop("nan")
    assert nan != nan
    assert plain == {"ints": [0, -1, 2**100], "float": 2.5, "c": 1 - 2j, "text": "héllo",
                     "raw": b"\x00\xff", "ba": bytearray(b"ab"), "none": None,
                     "flags": (True, False), (1, "k"): {1, 2}, "fs": frozenset({"a"}),
                     "deep": [[[[{"x": ()}]]]]}
    assert type(plain["ba"]) is bytearray and type(plain["flags"]) is tuple
    grid = r.outputs["grid"]
    assert grid.dtype == np.int32 and grid.shape == (3, 4) and grid.tolist()[2] == [8, 9, 10, 11]
    assert r.outputs["fgrid"].flags.f_contiguous and r.outputs["fgrid"][1, 2] == 1.0
    assert r.outputs["names"].tolist() == ["ab", "c"]
    assert str(r.outputs["days"][1]) == "2024-02-29"
    assert r.outputs["mask"].dtype == bool and int(r.outputs["mask"].sum()) == 6
    assert r.outputs["total"] == 66 and isinstance(r.outputs["total"], np.integer)
    grid[0, 0] = 7  # an ordinary, writable array


@CONTAINER
@pytest.mark.parametrize("how", ["write-and-exit", "replace-the-encoder"])
def test_a_crafted_pickle_from_the_container_runs_nothing_on_the_host(tmp_path, how):
    marker = str(tmp_path / "the-host-ran-container-code")
    if how == "write-and-exit":  # straight into the outputs fd, and no encoder after it
        code = FIND_OUTPUTS_FD + "os.ftruncate(fd, 0)\nos.pwrite(fd, evil, 0)\nos._exit(0)\n"
    else:  # the encoder itself, swapped for one that writes the pickle
        code = ("import sys\nx = 1\n"
                "sys.modules['pynsbook.engine.values'].encode_outputs = lambda names, ns: evil\n")
    r = pynsbook.run(code, inputs={"evil": _evil_pickle(marker)}, outputs=["x"])
    assert r.exit_code == 0, r.stderr
    assert not os.path.exists(marker), "unpickling what the container sent ran code on the host"
    assert r.outputs == {}
    assert list(r.output_errors) == ["*"]
    assert _one_line(r.output_errors["*"]).startswith(
        "nothing came back: the container sent back something that is not a variables payload")


@CONTAINER
def test_a_hostile_payload_in_the_new_format_is_refused_one_line_per_variable():
    np_object = _npy("{'descr': '|O', 'fortran_order': False, 'shape': (1,), }", b"\0" * 8)
    payload = _frame(_entry(b"v", "x", _tagged(b"a", np_object)),
                     _entry(b"v", "ok", b"N"),
                     _entry(b"v", "print", b"T"),  # not asked for: must not reach the namespace
                     _entry(b"p", "y", "forged\n\x1b[2Jline".encode()))
    code = FIND_OUTPUTS_FD + "os.ftruncate(fd, 0)\nos.pwrite(fd, payload, 0)\nos._exit(0)\n"
    r = pynsbook.run(code, inputs={"payload": payload}, outputs=["x", "ok", "y", "z"])
    assert r.outputs == {"ok": None}
    assert _one_line(r.output_errors["x"]) == (
        "refused what the container sent: the array at offset 0 has dtype object; only bool, "
        "numeric, str and datetime dtypes come back")
    assert _one_line(r.output_errors["y"]) == "forged??[2Jline"  # no newline, no escape
    assert r.output_errors["z"] == "the container did not send it"


@CONTAINER
def test_what_cannot_come_back_is_one_line_per_variable_and_the_rest_comes_back():
    pytest.importorskip("numpy")
    r = pynsbook.run(
        "import numpy as np\n"
        "class Model:\n    pass\n"
        "model = Model()\nf = lambda: 1\nobjs = np.array([1, 'x'], dtype=object)\n"
        "cfg = {'lr': 0.1, 'hook': print}\nloop = []\nloop.append(loop)\n"
        "kept = [1, 'two', 3.0]\narr = np.ones(3)\n",
        outputs=["model", "f", "objs", "cfg", "loop", "kept", "arr", "missing"])
    assert r.exit_code == 0, r.stderr
    assert r.outputs["kept"] == [1, "two", 3.0] and r.outputs["arr"].tolist() == [1.0] * 3
    assert set(r.outputs) == {"kept", "arr"}
    can = ("cannot come back from a container; plain values (numbers, str, bytes, list, "
           "tuple, dict, set) and NumPy arrays can")
    errors = {k: _one_line(v) for k, v in r.output_errors.items()}
    assert errors == {
        "model": f"a Model object {can}",
        "f": f"a function {can}",
        "objs": f"a NumPy array of dtype object {can}",
        "cfg": f"a dict holding a built-in function at cfg['hook'] {can}",
        "loop": f"a list nested more than {values.MAX_DEPTH} deep (or holding itself) {can}",
        "missing": "not defined",
    }


@CONTAINER
def test_a_persistent_container_sends_values_back_the_same_way():
    with pynsbook.Container() as c:
        c.run("rows = [1, 2]", persistent=True)
        r = c.run("rows.append({'k': (3,)})\ngen = (i for i in rows)", persistent=True,
                  outputs=["rows", "gen"])
    assert r.outputs == {"rows": [1, 2, {"k": (3,)}]}
    assert r.output_errors["gen"].startswith("a generator cannot come back from a container")


# ---------------------------------------------------------------------------------------
# in a notebook: what the cell prints

from tests.test_magics import kernel  # noqa: E402,F401  (a real kernel, one per module)


@pytest.mark.needs("root", "cgroups")
def test_a_cell_says_in_one_line_what_did_not_come_back(kernel, tmp_path):
    from tests.test_magics import stream
    reply, msgs = kernel.execute("%%container -o model total\n"
                                 "class Model:\n    pass\nmodel = Model()\ntotal = 3\n")
    assert reply["status"] == "ok"
    assert stream(msgs, "stderr") == (
        "pynsbook: -o model: a Model object cannot come back from a container; plain values "
        "(numbers, str, bytes, list, tuple, dict, set) and NumPy arrays can\n")
    assert kernel.ok("print(total, 'model' in dir())") == "3 False\n"
    # the attack, as a notebook user meets it: one line, and nothing ran in the kernel
    marker = str(tmp_path / "the-kernel-ran-container-code")
    kernel.ok(f"evil = {_evil_pickle(marker)!r}")
    reply, msgs = kernel.execute("%%container -i evil -o x\n" + FIND_OUTPUTS_FD
                                 + "os.pwrite(fd, evil, 0)\nos._exit(0)\n")
    assert reply["status"] == "ok"
    assert not os.path.exists(marker)
    err = stream(msgs, "stderr")
    assert err.count("\n") == 1 and err.startswith("pynsbook: -o *: nothing came back: "), err
    assert kernel.ok("print('x' in dir())") == "False\n"


# ---------------------------------------------------------------------------------------
# the decoder, fed hostile bytes directly

def _refused(data: bytes) -> str:
    with pytest.raises(values.Malformed) as err:
        values.decode(data)
    return _one_line(str(err.value))


def test_a_pickle_is_not_a_value_and_running_it_is_impossible(tmp_path):
    marker = str(tmp_path / "marker")
    for data in (pickle.dumps(_MakesMarker(marker)), pickle.dumps(_MakesMarker(marker), 0)):
        _refused(data)
        with pytest.raises(values.Malformed, match="not a variables payload"):
            values.decode_outputs(data, ["x"])
    assert not os.path.exists(marker)


def test_deep_nesting_is_refused():
    deep = b"l" + struct.pack(">Q", 1)
    assert _refused(deep * (values.MAX_DEPTH + 1) + b"N") == \
        f"values nested more than {values.MAX_DEPTH} deep"
    assert values.decode(deep * values.MAX_DEPTH + b"N") is not None  # the limit itself is fine


@pytest.mark.parametrize("data, says", [
    (b"s" + struct.pack(">Q", 2**64 - 1) + b"abc", "a string of 18446744073709551615 bytes"),
    (b"b" + struct.pack(">Q", 1 << 40), "runs past the end"),
    (b"l" + struct.pack(">Q", 10**12) + b"N", "an item count of 1000000000000 at offset 1 is more"),
    (b"d" + struct.pack(">Q", 1 << 62), "is more than the 0 bytes left"),
    (b"i" + struct.pack(">Q", 1 << 50) + b"\x01", "an int of 1125899906842624 bytes"),
    (b"X", "unknown tag b'X' at offset 0"),
    (b"\x80", "unknown tag b'\\x80'"),
    (b"N\x00", "1 bytes follow the value"),
    (b"", "a tag of 1 bytes at offset 0 runs past the end"),
    (b"d" + struct.pack(">Q", 1) + b"l" + struct.pack(">Q", 0) + b"N",
     "a dict key at offset 0 is a list, which cannot be hashed"),
    (b"s" + struct.pack(">Q", 2) + b"\xff\xfe", "is not UTF-8"),
])
def test_hostile_lengths_and_tags_are_refused_in_one_line(data, says):
    assert says in _refused(data)


def test_keys_crafted_to_share_one_hash_are_refused():
    m = 2**61 - 1  # hash(n) == hash(n + k * m): an O(n^2) dict without a limit
    keys = b"".join(b"i" + struct.pack(">Q", 9) + (1 + k * m).to_bytes(9, "big", signed=True)
                    + b"N" for k in range(values.MAX_SAME_HASH + 1))
    assert "share one hash" in _refused(b"d" + struct.pack(">Q", values.MAX_SAME_HASH + 1) + keys)


@pytest.mark.parametrize("header, data, says", [
    ("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", b"\0" * 16, "dtype object"),
    ("{'descr': [('a', '|O')], 'fortran_order': False, 'shape': (1,), }", b"\0" * 8,
     "dtype [('a', 'O')]"),
    ("{'descr': 'os.system', 'fortran_order': False, 'shape': (1,), }", b"\0" * 8,
     "bad .npy header"),
    ("{'descr': '<f8', 'fortran_order': False, 'shape': __import__('os').getpid(), }", b"",
     "bad .npy header"),
    ("{'descr': '<f8', 'fortran_order': False, 'shape': (99999999999999,), }", b"\0" * 8,
     "declares 99999999999999 items of 8 bytes but holds 8 bytes"),
    ("{'descr': '<f8', 'fortran_order': False, 'shape': (-1,), }", b"", "a bad shape"),
    ("{'descr': '<f8', 'fortran_order': False, 'shape': (1,), }", b"\0" * 8 + b"x",
     "holds 9 bytes"),
])
def test_hostile_npy_arrays_are_refused(header, data, says):
    assert says in _refused(_tagged(b"a", _npy(header, data)))


def test_an_npy_header_too_long_to_parse_safely_is_refused():
    huge = b"\x93NUMPY\x01\x00" + struct.pack("<H", 60000) + b"{" * 60000
    assert "a .npy header of 60000 bytes" in _refused(_tagged(b"a", huge))


def test_a_broken_frame_is_one_error_and_a_bad_value_costs_only_its_variable():
    good = _entry(b"v", "a", values.encode([1, 2]))
    bad = _entry(b"v", "b", b"l" + struct.pack(">Q", 5))
    assert values.decode_outputs(_frame(good, bad), ["a", "b"]) == (
        {"a": [1, 2]},
        {"b": "refused what the container sent: an item count of 5 at offset 1 is more than "
              "the 0 bytes left"})
    for broken in (_frame(good)[:-1], _frame(good) + b"\0", values.MAGIC + b"\xff" * 4,
                   _frame(_entry(b"q", "a", b"N"))):
        with pytest.raises(values.Malformed) as err:
            values.decode_outputs(broken, ["a"])
        _one_line(str(err.value))


def test_encode_and_decode_agree():
    np = pytest.importorskip("numpy")
    value = [None, True, 0, -(2**70), 1e300, float("-inf"), 3j, "\udc80 lone surrogate",
             b"", bytearray(), (), {(): frozenset()}, {0.5}, np.zeros((0, 3)),
             np.array([[1 + 2j]]), np.float32(1.5), np.bool_(True), np.array(b"ab")]
    back = values.decode(values.encode(value))
    assert back[:13] == value[:13]
    assert [type(v) for v in back] == [type(v) for v in value]
    assert back[13].shape == (0, 3) and back[14][0, 0] == 1 + 2j and back[15] == np.float32(1.5)
    assert back[17] == np.array(b"ab")


class Sub(list):
    pass


def test_encoding_refuses_what_is_not_plain_data():
    np = pytest.importorskip("numpy")
    for value, what in ((Sub(), "a tests Sub"), (np.ma.masked_array([1]), "a numpy MaskedArray"),
                        (np.array([None]), "a NumPy array of dtype object"),
                        (io.BytesIO(), "an io BytesIO")):
        with pytest.raises(values.Unsupported) as err:
            values.encode(value)
        assert err.value.what == what


def test_a_payload_of_more_than_a_million_values_is_refused_in_one_line():
    """Hostile bytes cost the notebook a bounded time and memory: a million small values
    at most (an empty set is 9 bytes sent and ~200 held); large data comes back as arrays."""
    from pynsbook.engine import values
    with pytest.raises(values.Malformed) as info:
        values.decode(values.encode([set()] * (values.MAX_ITEMS + 1)))
    assert f"more than {values.MAX_ITEMS} values" in str(info.value)
