"""The plain values that may cross from a container back to the host (``-o VAR``).

What a container sends back is hostile input: code in the container can write any bytes
at all where the values go. So this is not pickle (which runs whatever the bytes name),
but a small length-prefixed binary format that can only describe data:

- a value is one tag byte, then what that tag needs: ``N`` None, ``T``/``F`` booleans,
  ``i`` an int (u64 length, signed big-endian bytes), ``f`` a float and ``c`` a complex
  (IEEE doubles), ``s``/``b``/``y`` str (UTF-8), bytes and bytearray (u64 length, then
  the bytes), ``l``/``t``/``e``/``z`` list, tuple, set and frozenset (u64 count, then the
  items), ``d`` a dict (u64 count, then key, value, key, value...), ``a`` a NumPy array
  and ``g`` a NumPy scalar (u64 length, then a ``.npy`` file, numeric, bool, str or
  datetime dtypes only, read with ``allow_pickle=False``);
- a variables payload is ``MAGIC``, a u32 count, then per variable: ``v`` (a value) or
  ``p`` (why it could not be sent), its name (u32 length, UTF-8), and a u64 length and
  the encoded value or the UTF-8 reason.

The decoder only ever builds those types. It never imports or calls anything the bytes
name, and it bounds the nesting depth, the number of items and the total size, refusing
any length that runs past the end before it allocates anything.
"""
from __future__ import annotations

import io
import struct
import sys
from collections import Counter
from typing import Any, Dict, List, Mapping, Sequence, Tuple

#: the first bytes of a variables payload (and the format's version)
MAGIC = b"\x93pynsbook-values/1\n"
#: the most bytes of variables one run may send back
MAX_BYTES = 1 << 30
#: the deepest nesting of containers (a list in a dict in a list...)
MAX_DEPTH = 100
#: the most values (every item of every container counts) one payload may hold: an empty
#: set is 9 bytes sent and ~200 held, so this bounds what hostile bytes cost the notebook
#: (large data comes back as a NumPy array, which counts as one)
MAX_ITEMS = 1_000_000
#: distinct dict keys or set items with one and the same hash: more is a collision attack
MAX_SAME_HASH = 64
#: the longest .npy header accepted (NumPy's own default limit)
MAX_NPY_HEADER = 10_000
#: NumPy dtype kinds that come back: bool, ints, floats, complex, str, bytes, datetimes
NPY_KINDS = "biufcUSmM"

CAN_COME_BACK = ("plain values (numbers, str, bytes, list, tuple, dict, set) and NumPy "
                 "arrays can")

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_DOUBLE = struct.Struct(">d")
_COMPLEX = struct.Struct(">dd")
_SEQ_TAGS = {list: b"l", tuple: b"t", set: b"e", frozenset: b"z"}
_BYTES_TAGS = {str: b"s", bytes: b"b", bytearray: b"y"}
_BUILTIN_NAMES = {"builtin_function_or_method": "built-in function", "type": "class",
                  "method": "bound method"}


class Unsupported(ValueError):
    """A value that cannot come back; ``what`` says what it is, ``path`` where it sat."""

    def __init__(self, what: str, path: str = "") -> None:
        super().__init__(what + (f" at {path}" if path else ""))
        self.what = what
        self.path = path


class _TooDeep(Unsupported):
    """Nesting past ``MAX_DEPTH`` (or a container that holds itself)."""


class Malformed(ValueError):
    """Bytes that are not a valid payload; the message is one line saying why."""


# ---------------------------------------------------------------------------------------
# encoding (runs in the container)

def encode(value: Any) -> bytes:
    """The bytes of ``value``; raises :class:`Unsupported` for anything but plain values
    and NumPy arrays (a class instance, a function, an object array, a cycle...)."""
    parts: List[bytes] = []
    _encode(value, parts, 0, "")
    return b"".join(parts)


def _encode(value: Any, parts: List[bytes], depth: int, path: str) -> None:
    kind = type(value)
    if value is None:
        parts.append(b"N")
    elif kind is bool:
        parts.append(b"T" if value else b"F")
    elif kind is int:
        raw = value.to_bytes((value.bit_length() + 8) // 8, "big", signed=True)
        parts += [b"i", _U64.pack(len(raw)), raw]
    elif kind is float:
        parts += [b"f", _DOUBLE.pack(value)]
    elif kind is complex:
        parts += [b"c", _COMPLEX.pack(value.real, value.imag)]
    elif kind in _BYTES_TAGS:
        raw = value.encode("utf-8", "surrogatepass") if kind is str else bytes(value)
        parts += [_BYTES_TAGS[kind], _U64.pack(len(raw)), raw]
    elif kind in _SEQ_TAGS or kind is dict:
        if depth >= MAX_DEPTH:
            raise _TooDeep(f"nested more than {MAX_DEPTH} deep (or holding itself)")
        parts += [_SEQ_TAGS.get(kind, b"d"), _U64.pack(len(value))]
        if kind is dict:
            for key, item in value.items():
                _encode(key, parts, depth + 1, f"{path} (a key)")
                _encode(item, parts, depth + 1, f"{path}[{_short(key)}]")
        else:
            ordered = kind in (list, tuple)
            for i, item in enumerate(value):
                _encode(item, parts, depth + 1, f"{path}[{i}]" if ordered else f"{path} (an item)")
    else:
        np = sys.modules.get("numpy")
        if np is not None and isinstance(value, (np.ndarray, np.generic)):
            parts += [b"a" if isinstance(value, np.ndarray) else b"g", *_npy(np, value, path)]
        else:
            raise Unsupported(_a(value), path)


def _npy(np: Any, value: Any, path: str) -> Tuple[bytes, bytes]:
    if isinstance(value, np.ndarray) and type(value) is not np.ndarray:
        raise Unsupported(_a(value), path)  # a matrix, a masked array: more than its data
    dtype = value.dtype
    if dtype.hasobject or dtype.kind not in NPY_KINDS or dtype.itemsize == 0:
        raise Unsupported(f"a NumPy {'array' if isinstance(value, np.ndarray) else 'scalar'} "
                          f"of dtype {dtype}", path)
    from numpy.lib import format as npy_format
    buf = io.BytesIO()
    npy_format.write_array(buf, np.asarray(value), allow_pickle=False)
    raw = buf.getvalue()
    return _U64.pack(len(raw)), raw


def _a(value: Any) -> str:
    """'a pandas DataFrame', 'a function', 'a Point object'."""
    np = sys.modules.get("numpy")
    if np is not None and type(value) is np.ndarray:
        return f"a NumPy array of dtype {value.dtype}"
    kind = type(value)
    module = str(getattr(kind, "__module__", None) or "").split(".")[0]
    name = kind.__name__
    if module == "__main__":
        text = f"{name} object"
    elif module.lstrip("_") in ("builtins", ""):
        text = _BUILTIN_NAMES.get(name, name)
    else:
        text = f"{module.lstrip('_')} {name}"
    return ("an " if text[:1].lower() in "aeiou" else "a ") + text


def _short(key: Any) -> str:
    text = repr(key)
    return text if len(text) <= 40 else text[:37] + "..."


def encode_outputs(names: Sequence[str], namespace: Mapping[str, Any]) -> bytes:
    """A variables payload: each named variable of ``namespace`` that can come back, and
    for each that cannot, one line saying why (naming its type and what can)."""
    entries: List[bytes] = []
    total = len(MAGIC) + _U32.size
    for name in names:
        if name not in namespace:
            kind, body = b"p", "not defined".encode()
        else:
            try:
                kind, body = b"v", encode(namespace[name])
            except Unsupported as err:
                kind, body = b"p", _why_not(name, namespace[name], err).encode("utf-8", "replace")
            except Exception as err:  # an array NumPy cannot write, say
                kind, body = b"p", (f"could not be encoded ({type(err).__name__}: {err})"
                                    .encode("utf-8", "replace"))
        raw_name = name.encode("utf-8", "surrogatepass")
        head = kind + _U32.pack(len(raw_name)) + raw_name + _U64.pack(len(body))
        if kind == b"v" and total + len(head) + len(body) > MAX_BYTES:
            body = (f"is {_size(len(body))} encoded; at most {_size(MAX_BYTES)} of variables "
                    "can come back from one run").encode()
            head = b"p" + _U32.pack(len(raw_name)) + raw_name + _U64.pack(len(body))
        total += len(head) + len(body)
        entries += [head, body]
    return MAGIC + _U32.pack(len(names)) + b"".join(entries)


def _why_not(name: str, value: Any, err: Unsupported) -> str:
    if isinstance(err, _TooDeep):
        what = f"{_a(value)} {err.what}"
    elif err.path:
        what = f"{_a(value)} holding {err.what} at {name}{_line(err.path, 60)}"
    else:
        what = err.what
    return f"{what} cannot come back from a container; {CAN_COME_BACK}"


def _size(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:g} {unit}" if unit == "bytes" else f"{n:.3g} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# ---------------------------------------------------------------------------------------
# decoding (runs on the host: the bytes are hostile)

class _Reader:
    def __init__(self, data: memoryview, items: List[int]) -> None:
        self.data = data
        self.pos = 0
        self.items = items  # shared between the values of one payload

    def take(self, n: int, what: str) -> memoryview:
        if n > len(self.data) - self.pos:
            raise Malformed(f"{what} of {n} bytes at offset {self.pos} runs past the end "
                            f"({len(self.data)} bytes)")
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def u32(self, what: str) -> int:
        return int(_U32.unpack(self.take(4, what))[0])

    def u64(self, what: str) -> int:
        return int(_U64.unpack(self.take(8, what))[0])

    def count(self, what: str) -> int:
        n = self.u64(what)
        if n > len(self.data) - self.pos:  # every item takes at least one byte
            raise Malformed(f"{what} of {n} at offset {self.pos - 8} is more than the "
                            f"{len(self.data) - self.pos} bytes left")
        return n

    def value(self, depth: int) -> Any:
        self.items[0] += 1
        if self.items[0] > MAX_ITEMS:
            raise Malformed(f"more than {MAX_ITEMS} values")
        at = self.pos
        tag = bytes(self.take(1, "a tag"))
        if tag == b"N":
            return None
        if tag in (b"T", b"F"):
            return tag == b"T"
        if tag == b"i":
            return int.from_bytes(self.take(self.u64("an int's length"), "an int"), "big",
                                  signed=True)
        if tag == b"f":
            return float(_DOUBLE.unpack(self.take(8, "a float"))[0])
        if tag == b"c":
            real, imag = _COMPLEX.unpack(self.take(16, "a complex"))
            return complex(real, imag)
        if tag in (b"s", b"b", b"y"):
            raw = self.take(self.u64("a length"), "a string")
            if tag == b"s":
                try:
                    return str(raw, "utf-8", "surrogatepass")
                except UnicodeDecodeError as err:
                    raise Malformed(f"a str at offset {at} is not UTF-8 ({err.reason})") from None
            return bytes(raw) if tag == b"b" else bytearray(raw)
        if tag in (b"l", b"t", b"e", b"z", b"d"):
            if depth >= MAX_DEPTH:
                raise Malformed(f"values nested more than {MAX_DEPTH} deep")
            n = self.count("an item count")
            if tag == b"d":
                return self._dict(n, depth + 1, at)
            items = [self.value(depth + 1) for _ in range(n)]
            if tag == b"l":
                return items
            if tag == b"t":
                return tuple(items)
            unique = _hashable(items, at, "set item")
            return set(unique) if tag == b"e" else frozenset(unique)
        if tag in (b"a", b"g"):
            raw = self.take(self.u64("an array's length"), "an array")
            return _read_npy(raw, scalar=tag == b"g", at=at)
        raise Malformed(f"unknown tag {tag!r} at offset {at}")

    def _dict(self, n: int, depth: int, at: int) -> Dict[Any, Any]:
        pairs = [(self.value(depth), self.value(depth)) for _ in range(n)]
        _hashable([k for k, _ in pairs], at, "dict key")
        return dict(pairs)


def _hashable(items: List[Any], at: int, what: str) -> List[Any]:
    """``items`` if they can be dict keys or set items without a hash-collision slowdown:
    plain values hash without running any code, but ints and tuples hash predictably."""
    seen: set = set()
    same: Counter = Counter()
    for item in items:
        try:
            h = hash(item)
        except TypeError:
            raise Malformed(f"a {what} at offset {at} is {_a(item)}, which cannot be hashed") from None
        if item not in seen:
            same[h] += 1
            if same[h] > MAX_SAME_HASH:
                raise Malformed(f"more than {MAX_SAME_HASH} {what}s at offset {at} share one "
                                "hash")
            seen.add(item)
    return items


def _read_npy(raw: memoryview, *, scalar: bool, at: int) -> Any:
    try:
        import numpy as np
        from numpy.lib import format as npy_format
    except ImportError:
        raise Malformed("a NumPy array came back, but NumPy is not installed here") from None
    # the header's length, checked before NumPy parses the header (older NumPy set no limit)
    head = bytes(raw[:12])
    if len(head) < 10 or head[:6] != b"\x93NUMPY" or head[6:8] not in (b"\x01\x00", b"\x02\x00"):
        raise Malformed(f"the array at offset {at} is not a version 1 or 2 .npy file")
    size = (struct.unpack("<H", head[8:10])[0] if head[6] == 1
            else struct.unpack("<I", head[8:12])[0] if len(head) == 12 else -1)
    if not 0 <= size <= MAX_NPY_HEADER:
        raise Malformed(f"the array at offset {at} has a .npy header of {size} bytes "
                        f"(at most {MAX_NPY_HEADER})")
    data = bytes(raw)
    fp = io.BytesIO(data)
    try:
        version = npy_format.read_magic(fp)
        read_header = (npy_format.read_array_header_1_0 if version == (1, 0)
                       else npy_format.read_array_header_2_0)
        shape, _fortran, dtype = read_header(fp)
    except Exception as err:  # ValueError mostly; a hostile header may try anything
        raise Malformed(f"the array at offset {at} has a bad .npy header "
                        f"({type(err).__name__}: {_line(str(err), 80)})") from None
    if dtype.hasobject or dtype.kind not in NPY_KINDS or dtype.itemsize == 0:
        raise Malformed(f"the array at offset {at} has dtype {_line(str(dtype), 80)}; only "
                        "bool, numeric, str and datetime dtypes come back")
    if not all(type(d) is int and d >= 0 for d in shape):
        raise Malformed(f"the array at offset {at} has a bad shape")
    if scalar and shape != ():
        raise Malformed(f"the NumPy scalar at offset {at} has shape {shape}")
    count = 1
    for d in shape:
        count *= d
    if count * dtype.itemsize != len(data) - fp.tell():
        raise Malformed(f"the array at offset {at} declares {count} items of {dtype.itemsize} "
                        f"bytes but holds {len(data) - fp.tell()} bytes")
    try:
        array = npy_format.read_array(io.BytesIO(data), allow_pickle=False)
    except Exception as err:
        raise Malformed(f"the array at offset {at} cannot be read "
                        f"({type(err).__name__}: {_line(str(err), 80)})") from None
    if type(array) is not np.ndarray or array.dtype != dtype or array.shape != tuple(shape):
        raise Malformed(f"the array at offset {at} did not read back as declared")
    return array[()] if scalar else array


def decode(data: bytes) -> Any:
    """The value ``encode`` made of it; raises :class:`Malformed` (one line) for anything
    else. Safe on hostile bytes: it builds plain values and NumPy arrays, nothing more."""
    return _decode(memoryview(data), [0])


def _decode(data: memoryview, items: List[int]) -> Any:
    if len(data) > MAX_BYTES:
        raise Malformed(f"{_size(len(data))} of data; at most {_size(MAX_BYTES)}")
    reader = _Reader(data, items)
    try:
        value = reader.value(0)
    except RecursionError:  # cannot happen within MAX_DEPTH, but a deep caller...
        raise Malformed("values nested too deep") from None
    except MemoryError:
        raise Malformed("not enough memory to hold what came back") from None
    if reader.pos != len(data):
        raise Malformed(f"{len(data) - reader.pos} bytes follow the value at offset {reader.pos}")
    return value


def _decode_quietly(data: memoryview, items: List[int]) -> Any:
    """_decode with the garbage collector paused: a million small containers would make it
    walk the heap again and again (minutes, in a hostile payload) for nothing to collect."""
    import gc
    was = gc.isenabled()
    gc.disable()
    try:
        return _decode(data, items)
    finally:
        if was:
            gc.enable()


def decode_outputs(data: bytes, names: Sequence[str]
                   ) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """The variables of a payload ``encode_outputs`` made, and one line per variable that
    did not come back, for the ``names`` asked for (anything else sent is dropped).

    A broken frame raises :class:`Malformed`; a bad value costs only its own variable.
    """
    if len(data) > MAX_BYTES:
        raise Malformed(f"the container sent {_size(len(data))}; at most {_size(MAX_BYTES)} "
                        "of variables can come back")
    view = memoryview(data)
    if bytes(view[:len(MAGIC)]) != MAGIC:
        raise Malformed("the container sent back something that is not a variables payload "
                        f"(it starts {_line(repr(bytes(view[:12])), 40)})")
    reader = _Reader(view[len(MAGIC):], [0])
    wanted = set(names)
    values: Dict[str, Any] = {}
    problems: Dict[str, str] = {}
    for _ in range(reader.u32("the variable count")):
        kind = bytes(reader.take(1, "an entry kind"))
        try:
            name = str(reader.take(reader.u32("a name's length"), "a name"), "utf-8")
        except UnicodeDecodeError:
            raise Malformed("a variable's name is not UTF-8") from None
        body = reader.take(reader.u64("an entry's length"), "an entry")
        if kind not in (b"v", b"p"):
            raise Malformed(f"unknown entry kind {kind!r}")
        if name not in wanted:
            continue
        if kind == b"p":
            values.pop(name, None)
            problems[name] = _line(str(body[:1600], "utf-8", "replace"), 400)
            continue
        try:
            values[name] = _decode_quietly(body, reader.items)
            problems.pop(name, None)
        except Malformed as err:
            values.pop(name, None)
            problems[name] = f"refused what the container sent: {err}"
    if reader.pos != len(reader.data):
        raise Malformed(f"{len(reader.data) - reader.pos} stray bytes after the variables")
    for name in names:
        if name not in values and name not in problems:
            problems[name] = "the container did not send it"
    return values, problems


def _line(text: str, limit: int) -> str:
    """``text`` as one printable line of at most ``limit`` characters (the container wrote
    it: no newlines or terminal escapes reach the notebook)."""
    clean = "".join(c if c.isprintable() else "?" for c in text[:limit + 1])
    return clean if len(clean) <= limit else clean[:limit - 3] + "..."
