"""sim: the NeuronCore-like machine — MachineSpec presets, ISA, functional and timing simulators."""
from .machine import ENGINES, PRESETS, MachineSpec, SimError, machine
from .isa import AP, Addr, Buffer, Instr, Loop, Program, TensorDecl, dynamic_count, walk_instrs
from .validate import validate
from .asm import assemble, disassemble
from .functional import run
from .report import Report
from .timing import simulate

__all__ = ["ENGINES", "PRESETS", "MachineSpec", "SimError", "machine", "AP", "Addr", "Buffer",
           "Instr", "Loop", "Program", "TensorDecl", "dynamic_count", "walk_instrs", "validate",
           "assemble", "disassemble", "run", "Report", "simulate"]
