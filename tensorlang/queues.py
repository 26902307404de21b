"""DMA queue assignment: every tile DMA of a lowered program cut into pieces over the
machine's DMA queues (`assign_queues`), and the AP slicing that cutting (and lowering) uses.

Queues are in-order: a load queued behind a store (which waits for its tile to be computed)
would stall the compute that needs the load. So loads and stores get their own pools of
queues, sized by the queue time each kind costs; the prologue's loads and the epilogue's
stores take every queue. Pieces are whole partition blocks (the timing model's dependency
unit), balanced over the queues of a pool by queue time x loop trips.
"""
from __future__ import annotations

import math

import sim
from sim import isa
from sim.timing import contiguous_runs, partition_block

from .ir import ITEMSIZE

DMA_PIECE_BYTES = 4096  # compiler choice: a tile DMA is split over up to dma_queues pieces of >= this
STORE_TRANSFER_BINS = 2  # compiler choice: store transfers of <= this many HBM bins of queue time
POOL_MIN_GAIN = 0.1   # compiler choice: a store pool above the byte share must lighten the busiest
                      # queue by this fraction


def _slice_ap(ap: isa.AP, d: int, start: int, n: int) -> isa.AP:
    """Elements [start, start + n) of dimension d (a free dimension) of `ap`."""
    stride, _ = ap.dims[d]
    unit = 1 if ap.mem == "hbm" else ap.itemsize
    return isa.AP(ap.mem, ap.name, ap.dtype, ap.offset + start * stride * unit,
                  ap.dims[:d] + ((stride, n),) + ap.dims[d + 1:], ap.part)


def _sub_ap(ap: isa.AP, start: int, n: int) -> isa.AP:
    (stride, size), rest = ap.dims[0], ap.dims[1:]
    if start == 0 and n == size:
        return ap
    if ap.mem == "hbm":
        return isa.AP(ap.mem, ap.name, ap.dtype, ap.offset + start * stride if start else ap.offset,
                      ((stride, n),) + rest, ap.part)
    return isa.AP(ap.mem, ap.name, ap.dtype, ap.offset, ((stride, n),) + rest, ap.part + start)


def assign_queues(body: tuple, spec: sim.MachineSpec) -> tuple:
    """Split every DMA over the DMA queues. Loads and stores (DMAs writing HBM) get their own
    pools of queues, sized by the queue time each kind costs outside the prologue and the
    epilogue (bytes plus dma_chunk_overhead_bytes per contiguous chunk, times the enclosing
    loops' trip counts; the prologue's loads and the epilogue's stores, below, take every
    queue): queues are in-order, so a load queued behind a store (which waits for its tile
    to be computed) would stall the compute that needs it. Each transfer is cut along its
    first dimension into up to one piece per queue of its pool (pieces of whole partition
    blocks and of at least DMA_PIECE_BYTES, floor/ceil blocks each), and each piece goes to
    the pool's queue with the least queue time so far (its cost times its trip count): the
    queues' totals over the program differ by at most one piece. A transfer cut into every
    queue of its pool with blocks left over (e.g. 32 blocks over 15 queues) gets whole
    blocks on every queue and the left-over rows cut along the last dimension (at granule
    boundaries, see _column_pieces; in whole-block groups first when a row has fewer
    granules than the pool has queues, see _leftover_pieces), so even a transfer inside a
    loop (the same queues at every trip) keeps every queue about equally busy. A store's pieces are cut further into
    consecutive transfers of about STORE_TRANSFER_BINS HBM-channel bins of queue time each
    (see _sequential): stores start all at once when a tile is done, and long ones would
    claim the shared channel ahead of the loads queued behind them (transpose 4096^2 on
    trn2: 264 -> 224 us). Without both kinds, or with one queue,
    there is one pool of all queues. The store pool has the store bytes' share of the queues,
    rounded down or up, whichever leaves the busiest queue less to do (the pieces'
    granularity decides: bmm 8x2048x2048x128 on trn2 has 13.6 queues' worth of stores; 14
    store queues leave the 2 load queues 7% busier than 13 and 3 do, 572 -> 479 us together
    with the left-over pieces above), or one queue more than the rounded share when that
    leaves the busiest queue POOL_MIN_GAIN less to do (pieces are whole blocks: a store of 32
    blocks puts 4 blocks on some of 10 queues, 3 at most on 11). Loads that come before the
    first store in program order (the prologue: top-level fills, the peeled first
    iterations of a block loop, see Lowerer.bind_loop) use every queue: no store is queued
    ahead of them; so do stores after the last load (the epilogue: the peeled last
    iteration): no load is queued behind them."""
    n = spec.dma_queues
    blk = partition_block(spec)                    # pieces on whole partition blocks
    queues = [f"q{i}" for i in range(n)]

    first_store = next((k for k, node in enumerate(body)
                        if any(i.op == "dma" and i.dst.mem == "hbm" for i, _ in
                               isa.walk_instrs((node,)))), len(body))
    prologue = {id(i) for node in body[:first_store] for i, _ in isa.walk_instrs((node,))
                if i.op == "dma"}      # loads before the first store: no store can wait on them
    last_load = max((k for k, node in enumerate(body)
                     if any(i.op == "dma" and i.dst.mem != "hbm" for i, _ in
                            isa.walk_instrs((node,)))), default=-1)
    prologue |= {id(i) for node in body[last_load + 1:] for i, _ in isa.walk_instrs((node,))
                 if i.op == "dma"}     # stores after the last load: no load waits behind them
    trips, moved = {}, {False: 0, True: 0}
    for ins, loops in isa.walk_instrs(body):
        if ins.op == "dma":
            mult = math.prod(lp.extent for lp in loops)
            trips[id(ins)] = trips.get(id(ins), 0) + mult
            if id(ins) not in prologue:        # (prologue / epilogue: every queue)
                moved[ins.dst.mem == "hbm"] += mult * dma_queue_bytes(ins.dst, ins.srcs[0], spec)
    if n < 2 or not moved[False] or not moved[True]:
        sizes = [None]
    else:
        share = n * moved[True] / (moved[False] + moved[True])
        stores = min(n - 1, max(1, round(share)))
        other = min(n - 1, max(1, math.floor(share) if stores > share else math.ceil(share)))
        sizes = [stores] + [s for s in (other,) if s != stores] \
            + [s for s in (stores + 1,) if s < n and s != other]
    load = [0] * n                                 # queue bytes x trips so far, per queue
    cap = STORE_TRANSFER_BINS * spec.hbm_bin_ns * spec.dma_queue_gbps   # queue bytes
    nxt = {}                                       # per pool: where ties start (round robin)

    def split(ins: isa.Instr) -> list:
        kind = ins.dst.mem == "hbm" and pools[True] != pools[False]
        lo, size = (0, n) if id(ins) in prologue else pools[kind]
        dst, src = ins.dst, ins.srcs[0]
        P = dst.dims[0][1]
        nb = -(-P // blk)
        nbytes = dst.num_elements * ITEMSIZE[dst.dtype]
        qbytes = dma_queue_bytes(dst, src, spec)   # (short runs: their overhead counts)
        k = max(1, min(size, nb, (qbytes if qbytes > 2 * nbytes else nbytes) // DMA_PIECE_BYTES))
        per, extra = divmod(nb, k)

        def qb(piece):
            return dma_queue_bytes(*piece, spec)
        pieces = _block_rows(dst, src, 0, _even_counts(nb, k), blk)
        if k == size > 1 and extra:     # whole blocks everywhere, the rest cut into columns?
            r0 = min(P, per * k * blk)
            cols = _leftover_pieces(dst, src, r0, size, spec)
            if cols:
                even = _block_rows(dst, src, 0, [per] * k, blk)
                if qb(even[0]) + max(map(qb, cols)) < qb(pieces[0]):
                    pieces = even + cols
        mult = trips[id(ins)]
        cost = [qb(pc) * mult for pc in pieces]
        out, taken = [None] * len(pieces), set()
        for j in sorted(range(len(pieces)), key=lambda j: -cost[j]):
            if len(taken) == size:      # one piece per queue, then the next round
                taken.clear()
            start = nxt.get((lo, size), 0)
            q = min((i for i in range(lo, lo + size) if i not in taken),
                    key=lambda i: (load[i], (i - lo - start) % size))
            taken.add(q)
            load[q] += cost[j]
            nxt[(lo, size)] = (q - lo + 1) % size
            seq = _sequential(*pieces[j], cap, spec) if ins.dst.mem == "hbm" else [pieces[j]]
            out[j] = [isa.Instr("dma", queues[q], d, (s_,)) for d, s_ in seq]
        return [i for x in out for i in x]

    best = None
    for stores in sizes:    # the store pool size (bytes share, +1) whose busiest queue is least
        pools = ({False: (0, n), True: (0, n)} if stores is None else
                 {False: (0, n - stores), True: (n - stores, stores)})
        load[:] = [0] * n
        nxt.clear()
        out = tuple(_map_dmas(body, split))
        gain = POOL_MIN_GAIN if stores is not None and stores > max(sizes[:2]) else 0
        if best is None or max(load) < best[0] * (1 - gain):
            best = (max(load), out)
    return best[1]


def _sequential(dst: isa.AP, src: isa.AP, cap: float, spec: sim.MachineSpec) -> list:
    """A piece cut into consecutive transfers for one queue, each costing the queue about
    `cap` bytes at most: the HBM channel time a transfer needs is reserved from its start on
    (sim/timing.py), so a long transfer claims the shared channel in a burst at its start
    and stalls the other queues' transfers behind it; transfers of a few channel bins each
    keep the claims about as spread out as the queue time. Cut on whole partition blocks,
    then at granule boundaries of the last dimension (see _column_pieces): a cut through a
    block would order the transfers after every other queue's (sim/timing.py, WAW epochs)."""
    k = math.ceil(dma_queue_bytes(dst, src, spec) / cap)
    if k <= 1:
        return [(dst, src)]
    blk = partition_block(spec)
    P = dst.dims[0][1]
    nb = -(-P // blk)
    r = min(k, nb)
    out = _block_rows(dst, src, 0, _even_counts(nb, r), blk)
    if r < k:
        out = [c for d, s_ in out
               for c in (_column_pieces(d, s_, math.ceil(k / r), spec, 0) or [(d, s_)])]
    return out


def dma_queue_bytes(dst: isa.AP, src: isa.AP, spec: sim.MachineSpec) -> int:
    """What one transfer costs its queue, in bytes: the bytes moved plus
    dma_chunk_overhead_bytes per contiguous chunk (the simulator's DMA cost)."""
    b = max(dst.num_elements * ITEMSIZE[dst.dtype], src.num_elements * ITEMSIZE[src.dtype])
    return b + spec.dma_chunk_overhead_bytes * max(contiguous_runs(dst), contiguous_runs(src))


def _leftover_pieces(dst: isa.AP, src: isa.AP, r0: int, n: int,
                     spec: sim.MachineSpec) -> list | None:
    """Up to n pieces of the rows r0.. of a transfer (the blocks left over when every queue
    of a pool has its whole blocks): cut along the last dimension (_column_pieces); when the
    granules give fewer than n columns (e.g. 2 of a 2048-byte row of 1024-byte HBM granules),
    the rows are first cut into groups of whole partition blocks, so the pieces reach up to n
    queues: 4 blocks left over from 32 on 14 queues in 8 pieces of a block x half a row, not 2
    of 4 blocks (a store inside a loop takes the same queues every trip: its 2 busiest queues
    would do 1.4x the others' share, 20 KB instead of 24 KB against 18.3 on average)."""
    blk = partition_block(spec)
    P = dst.dims[0][1]
    cols = _column_pieces(_sub_ap(dst, r0, P - r0), _sub_ap(src, r0, P - r0), n, spec)
    nb = -(-(P - r0) // blk)
    groups = min(nb, n // len(cols)) if cols else nb
    if groups < 2:
        return cols
    out = []
    for d, s_ in _block_rows(dst, src, r0, _even_counts(nb, groups), blk):
        out += _column_pieces(d, s_, max(1, n // groups), spec) or [(d, s_)]
    return out


def _even_counts(nb: int, k: int) -> list:
    """nb blocks in k groups as even as they come, the larger groups first."""
    per, extra = divmod(nb, k)
    return [per + 1] * extra + [per] * (k - extra)


def _block_rows(dst: isa.AP, src: isa.AP, r0: int, counts, blk: int) -> list:
    """(dst, src) pieces of consecutive rows from r0 on, counts[i] partition blocks of blk
    rows each (the last one clipped at the transfer's rows)."""
    P = dst.dims[0][1]
    out, s0 = [], r0
    for c in counts:
        r = min(c * blk, P - s0)
        out.append((_sub_ap(dst, s0, r), _sub_ap(src, s0, r)))
        s0 += r
    return out


def _column_pieces(dst: isa.AP, src: isa.AP, n: int, spec: sim.MachineSpec,
                   least: int = DMA_PIECE_BYTES) -> list | None:
    """Up to n (dst, src) pieces of a transfer cut along its last dimension, at multiples of
    the destination's dependency granule (pieces on different queues then write different
    cells: no write-after-write order between them) and of at least DMA_PIECE_BYTES; None
    when that gives fewer than two pieces or the two sides' dimensions differ. When the last
    dimension is too short for n pieces, an on-chip destination's trailing dimensions
    contiguous on both sides are merged first (a plane's rows: [P, H, W] -> [P, H*W]) and the
    merged one is cut (not into HBM: its cells are the tensor's rows, a cut through a row
    would share a cell between queues)."""
    out = _column_cut(dst, src, n, spec, least)
    if dst.mem != "hbm" and (out is None or len(out) < n):
        merged = _merge_contiguous(dst, src)
        if merged is not None:
            more = _column_cut(*merged, n, spec, least)
            if more is not None and len(more) > len(out or ()):
                return more
    return out


def _merge_contiguous(dst: isa.AP, src: isa.AP):
    """(dst, src) with their trailing dimensions that are contiguous on both sides merged
    into one (at least two merged), else None."""
    dd, sd = list(dst.dims), list(src.dims)
    merged = False
    while (len(dd) > 2 and len(dd) == len(sd) and dd[-1][0] == 1 == sd[-1][0]
           and dd[-2][1] == sd[-2][1] and dd[-1][1] == sd[-1][1]
           and dd[-2][0] == dd[-1][1] == sd[-2][0]):
        dd[-2:] = [(1, dd[-2][1] * dd[-1][1])]
        sd[-2:] = [(1, sd[-2][1] * sd[-1][1])]
        merged = True
    if not merged:
        return None
    return (isa.AP(dst.mem, dst.name, dst.dtype, dst.offset, tuple(dd), dst.part),
            isa.AP(src.mem, src.name, src.dtype, src.offset, tuple(sd), src.part))


def _column_cut(dst: isa.AP, src: isa.AP, n: int, spec: sim.MachineSpec,
                least: int = DMA_PIECE_BYTES) -> list | None:
    """_column_pieces along the last dimension as it is. An SBUF/PSUM destination whose
    offset is off its granule by a fixed amount (a box's first row after a border row) is
    cut at the granules' own boundaries (the first piece is that much shorter): pieces on
    different queues then never share a cell."""
    if (len(dst.dims) < 2 or len(dst.dims) != len(src.dims) or dst.dims[-1][0] != 1
            or any(a[1] != b[1] for a, b in zip(dst.dims, src.dims))):
        return None
    item = ITEMSIZE[dst.dtype]
    gran = spec.hbm_granule_bytes if dst.mem == "hbm" else spec.dep_granule_bytes
    g = max(1, gran // item)
    d = len(dst.dims) - 1
    E = dst.dims[d][1]
    phase = 0
    if dst.mem != "hbm":
        off = dst.offset
        base, terms = (off, ()) if isinstance(off, int) else (off.base, off.terms)
        if all(c % gran == 0 for _, c, _ in terms) and base % gran % item == 0:
            phase = base % gran // item
    cuts = list(range(g - phase if phase else g, E, g))     # granule boundaries inside
    if cuts and E - cuts[-1] < g:                            # (a short last one merges)
        cuts.pop()
    segs = len(cuts) + 1
    m = min(n, segs, dst.num_elements * item // least if least else n)
    if m < 2:
        return None
    units, rest = divmod(segs, m)
    ends, k = [], 0
    for j in range(m - 1):
        k += units + (j < rest)
        ends.append(cuts[k - 1])
    out, c0 = [], 0
    for c1 in ends + [E]:
        out.append((_slice_ap(dst, d, c0, c1 - c0), _slice_ap(src, d, c0, c1 - c0)))
        c0 = c1
    return out


def _map_dmas(nodes, fn) -> list:
    """`nodes` with every DMA replaced by the instructions fn(dma) returns (loops rebuilt)."""
    out = []
    for node in nodes:
        if isinstance(node, isa.Loop):
            out.append(isa.Loop(node.var, node.extent, tuple(_map_dmas(node.body, fn))))
        elif node.op == "dma":
            out.extend(fn(node))
        else:
            out.append(node)
    return out
