"""Text assembler: `disassemble(program) -> str` and `assemble(text) -> Program`, exact inverses.

    program matmul
    tensor A input bfloat16[512,256]
    buffer A_sb sbuf part=0 partitions=128 offset=0 size=4096
    loop io 4:
      loop ko 2:
        dma.q0 sbuf:A_sb.bfloat16[p0@1024*(ko%2)][1,128][1,128] <- hbm:A.bfloat16[@32768*io+128*ko][256,128][1,128]
        matmul.pe psum:C_ps.float32[p0@0][1,128][1,512] <- sbuf:AT.bfloat16[p0@0][1,128][1,128], sbuf:B.bfloat16[p0@256][1,128][1,512] acc=add reset_on=[ko]

An instruction line is `OP.ENGINE DST[, DST2] [<- SRC, SRC...] [key=value ...]`.
An operand is `MEM:NAME.DTYPE[pPART@ADDR][stride,size]...`: the first bracket holds the
first partition (sbuf/psum; omitted for hbm when 0) and the address (hbm: elements;
sbuf/psum: bytes within a partition); then one [stride,size] per dim, the partition dim first.
An address is `base+coef*var+coef*(var%mod)...` (coefficient 1 is left out).
Attribute values: ints, floats (always with a '.', 'e', inf or nan), True/False/None, bare
words or "quoted strings", [lists] (tuples) and @addresses. Loop bodies are indented by two
spaces; `#` starts a comment. Parse errors name the line number and the token.
"""
from __future__ import annotations

import json
import re

from .isa import AP, Addr, Buffer, Instr, Loop, Program, TensorDecl
from .machine import SimError

INDENT = "  "
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_INT = re.compile(r"-?\d+\Z")

# ----------------------------------------------------------------------------------------
# printing


def format_addr(a: Addr) -> str:
    parts = []
    if a.base or not a.terms:
        parts.append(str(a.base))
    for var, coef, mod in a.terms:
        x = f"({var}%{mod})" if mod else var
        term = x if coef == 1 else f"-{x}" if coef == -1 else f"{coef}*{x}"
        if parts and not term.startswith("-"):
            term = "+" + term
        parts.append(term)
    return "".join(parts)


def format_ap(ap: AP) -> str:
    where = f"p{ap.part}@" if ap.mem != "hbm" or ap.part else "@"
    dims = "".join(f"[{s},{n}]" for s, n in ap.dims)
    return f"{ap.mem}:{ap.name}.{ap.dtype}[{where}{format_addr(ap.offset)}]{dims}"


def _is_bare(s: str) -> bool:
    if not _IDENT.match(s) or s in ("True", "False", "None"):
        return False
    try:
        float(s)  # "inf", "nan", "infinity" would read back as floats
        return False
    except ValueError:
        return True


def format_value(v) -> str:
    if v is None or isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, str):
        return v if _is_bare(v) else json.dumps(v)
    if isinstance(v, (tuple, list)):
        return "[" + ",".join(format_value(x) for x in v) + "]"
    if isinstance(v, Addr):
        return "@" + format_addr(v)
    raise SimError(f"cannot write attribute value {v!r} of type {type(v).__name__} as text")


def format_instr(ins: Instr) -> str:
    dsts = [ins.dst] + ([ins.dst2] if ins.dst2 is not None else [])
    s = f"{ins.op}.{ins.engine} " + ", ".join(format_ap(d) for d in dsts)
    if ins.srcs:
        s += " <- " + ", ".join(format_ap(a) for a in ins.srcs)
    for k, v in ins.attrs:
        s += f" {k}={format_value(v)}"
    return s


def _name(s: str) -> str:
    return s if s and not re.search(r"[\s\"#]", s) else json.dumps(s)


def disassemble(program: Program) -> str:
    lines = [f"program {_name(program.name)}"]
    for t in program.tensors:
        lines.append(f"tensor {t.name} {t.kind} {t.dtype}[{','.join(map(str, t.shape))}]")
    for b in program.buffers:
        lines.append(f"buffer {b.name} {b.mem} part={b.part} partitions={b.partitions} "
                     f"offset={b.offset} size={b.size}")

    def emit(nodes, depth):
        for n in nodes:
            if isinstance(n, Loop):
                lines.append(f"{INDENT * depth}loop {n.var} {n.extent}:")
                emit(n.body, depth + 1)
            else:
                lines.append(INDENT * depth + format_instr(n))

    emit(program.body, 0)
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------
# parsing


class _Line:
    def __init__(self, no: int, text: str):
        self.no, self.text = no, text

    def error(self, msg: str, token: str | None = None) -> SimError:
        at = f" at {token!r}" if token is not None else ""
        return SimError(f"asm line {self.no}: {msg}{at}\n    {self.text.strip()}")


def _split_top(s: str, seps: str) -> list[str]:
    """Split at separator characters outside brackets, parentheses and quotes."""
    out, depth, quote, cur, i = [], 0, False, [], 0
    while i < len(s):
        c = s[i]
        if quote:
            cur.append(c)
            if c == "\\" and i + 1 < len(s):
                cur.append(s[i + 1])
                i += 1
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
            cur.append(c)
        elif c in "[(":
            depth += 1
            cur.append(c)
        elif c in "])":
            depth -= 1
            cur.append(c)
        elif c in seps and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(c)
        i += 1
    out.append("".join(cur))
    return out


def _strip_comment(s: str) -> str:
    quote = False
    for i, c in enumerate(s):
        if c == '"' and (i == 0 or s[i - 1] != "\\"):
            quote = not quote
        elif c == "#" and not quote:
            return s[:i]
    return s


def _int(tok: str, ln: _Line, what: str) -> int:
    if not _INT.match(tok.strip()):
        raise ln.error(f"expected an integer {what}", tok)
    return int(tok)


_TERM = re.compile(r"(?:(\d+)\*)?(?:([A-Za-z_][A-Za-z0-9_]*)|\(([A-Za-z_][A-Za-z0-9_]*)%(\d+)\))\Z")


def parse_addr(s: str, ln: _Line) -> Addr:
    if not s:
        raise ln.error("empty address", s)
    base, terms = 0, []
    toks = re.findall(r"[+-]?[^+-]+", s)
    if "".join(toks) != s:
        raise ln.error("bad address (want base+coef*var+coef*(var%mod)...)", s)
    for tok in toks:
        sign, body = (-1, tok[1:]) if tok[0] == "-" else (1, tok.lstrip("+"))
        if _INT.match(body):
            base += sign * int(body)
            continue
        m = _TERM.match(body)
        if not m:
            raise ln.error("bad address term (want N, N*var, var, N*(var%M))", tok)
        coef = sign * (int(m.group(1)) if m.group(1) else 1)
        if m.group(2):
            terms.append((m.group(2), coef, 0))
        else:
            terms.append((m.group(3), coef, int(m.group(4))))
    return Addr(base, tuple(terms))


_AP = re.compile(r"(hbm|sbuf|psum):(.+)\.([A-Za-z0-9_]+)\[(?:p(-?\d+))?@([^\]]*)\]((?:\[[^\]]*\])*)\Z")


def parse_ap(tok: str, ln: _Line) -> AP:
    m = _AP.match(tok)
    if not m:
        raise ln.error("bad operand (want MEM:NAME.DTYPE[pPART@ADDR][stride,size]...)", tok)
    mem, name, dtype, part, addr, dims_s = m.groups()
    dims = []
    for d in re.findall(r"\[([^\]]*)\]", dims_s):
        sn = d.split(",")
        if len(sn) != 2:
            raise ln.error("bad dim (want [stride,size])", f"[{d}]")
        dims.append((_int(sn[0], ln, "stride"), _int(sn[1], ln, "size")))
    return AP(mem, name, dtype, parse_addr(addr, ln), tuple(dims), int(part) if part else 0)


def parse_value(tok: str, ln: _Line):
    if tok in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[tok]
    if tok.startswith("@"):
        return parse_addr(tok[1:], ln)
    if tok.startswith("["):
        if not tok.endswith("]"):
            raise ln.error("unclosed list", tok)
        inner = tok[1:-1]
        return tuple(parse_value(x, ln) for x in _split_top(inner, ",")) if inner else ()
    if tok.startswith('"'):
        try:
            return json.loads(tok)
        except ValueError:
            raise ln.error("bad quoted string", tok) from None
    if _INT.match(tok):
        return int(tok)
    try:
        return float(tok)
    except ValueError:
        pass
    if _IDENT.match(tok):
        return tok
    raise ln.error("bad attribute value", tok)


def _words(s: str) -> list[str]:
    return [w for w in _split_top(s, " \t") if w]


def parse_instr(body: str, ln: _Line) -> Instr:
    head, _, rest = body.partition(" ")
    op, dot, engine = head.partition(".")
    if not dot or not op or not engine:
        raise ln.error("expected OP.ENGINE", head)
    words = _words(rest)
    is_attr = [bool(re.match(r"[A-Za-z_][A-Za-z0-9_]*=", w)) for w in words]
    k = is_attr.index(True) if True in is_attr else len(words)   # attributes come last
    opnds, attr_words = words[:k], words[k:]
    arrow = opnds.index("<-") if "<-" in opnds else None
    dst_words = opnds if arrow is None else opnds[:arrow]
    dsts = [parse_ap(t.strip(), ln) for t in _split_top(" ".join(dst_words), ",") if t.strip()]
    if not dsts or len(dsts) > 2:
        raise ln.error("expected one destination (or two: dst, dst2)", " ".join(dst_words) or head)
    srcs = []
    if arrow is not None:
        src_text = " ".join(opnds[arrow + 1:])
        if not src_text.strip():
            raise ln.error("expected source operands after '<-'", "<-")
        srcs = [parse_ap(t.strip(), ln) for t in _split_top(src_text, ",")]
    attrs = []
    for w in attr_words:
        key, eq, val = w.partition("=")
        if not eq or not _IDENT.match(key):
            raise ln.error("expected key=value", w)
        attrs.append((key, parse_value(val, ln)))
    return Instr(op, engine, dsts[0], tuple(srcs), tuple(attrs), dsts[1] if len(dsts) > 1 else None)


def _parse_name(s: str, ln: _Line) -> str:
    s = s.strip()
    if s.startswith('"'):
        try:
            return json.loads(s)
        except ValueError:
            raise ln.error("bad quoted name", s) from None
    if not s:
        raise ln.error("missing name", s)
    return s


def assemble(text: str) -> Program:
    """Parse the text `disassemble` writes back into the identical Program."""
    name, tensors, buffers = None, [], []
    root: list = []
    # open blocks, innermost last: [indent of the header line, body list, indent of the body]
    stack: list[list] = [[-1, root, 0]]
    for no, raw in enumerate(text.splitlines(), 1):
        ln = _Line(no, raw)
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        if "\t" in line[: len(line) - len(line.lstrip())]:
            raise ln.error("indent with spaces, not tabs", line.strip()[:20])
        indent = len(line) - len(line.lstrip(" "))
        body = line.strip()
        word = body.split(" ", 1)[0]
        if word == "program":
            if name is not None:
                raise ln.error("second program header", word)
            name = _parse_name(body[len("program"):], ln)
            continue
        if name is None:
            raise ln.error("the text must start with 'program NAME'", word)
        if word == "tensor":
            m = re.fullmatch(r"tensor (\S+) (\S+) ([A-Za-z0-9_]+)\[([-\d,]*)\]", body)
            if not m:
                raise ln.error("expected 'tensor NAME KIND DTYPE[d0,d1,...]'", body)
            shape = tuple(_int(x, ln, "dimension") for x in m.group(4).split(",")) \
                if m.group(4) else ()
            tensors.append(TensorDecl(m.group(1), shape, m.group(3), m.group(2)))
            continue
        if word == "buffer":
            m = re.fullmatch(r"buffer (\S+) (\S+) part=(-?\d+) partitions=(-?\d+) "
                             r"offset=(-?\d+) size=(-?\d+)", body)
            if not m:
                raise ln.error("expected 'buffer NAME MEM part=P partitions=N offset=O size=S'",
                               body)
            buffers.append(Buffer(m.group(1), m.group(2), int(m.group(5)), int(m.group(6)),
                                  int(m.group(3)), int(m.group(4))))
            continue
        # body statements: close the loops this line is not indented into
        while indent <= stack[-1][0]:
            stack.pop()
        block = stack[-1]
        if block[2] is None:
            block[2] = indent          # first statement of a loop body sets its indent
        if indent != block[2]:
            raise ln.error(f"unexpected indent {indent} (this block is indented {block[2]})",
                           word)
        if word == "loop":
            m = re.fullmatch(r"loop (\S+) (\S+):", body)
            if not m:
                raise ln.error("expected 'loop VAR EXTENT:'", body)
            if not _IDENT.match(m.group(1)):
                raise ln.error("bad loop variable", m.group(1))
            extent = _int(m.group(2), ln, "loop extent")
            children: list = []
            block[1].append((m.group(1), extent, children))
            stack.append([indent, children, None])
        else:
            block[1].append(parse_instr(body, ln))
    if name is None:
        raise SimError("asm line 1: the text must start with 'program NAME'")

    def build(items) -> tuple:
        return tuple(Loop(x[0], x[1], build(x[2])) if isinstance(x, tuple) else x for x in items)

    return Program(name, tuple(tensors), build(root), tuple(buffers))


__all__ = ["assemble", "disassemble", "format_instr", "format_ap", "format_addr",
           "format_value", "parse_ap", "parse_addr"]
