"""llmpack.converter.quantize — how weight matrices become group-wise integer codes.

- options:     QuantOptions (bits, group size, method, --keep, --target-bpw, calibration) and checks
- layers:      one decoder layer on a calibration batch, stage by stage (inputs of each linear group)
- gptq:        GPTQ with damping, activation order and lazy batch updates
- awq:         activation-aware scales, folded into the preceding norm / linear
- sensitivity: per-tensor damage estimates (Fisher-weighted) and the --target-bpw allocation
- calib:       calibration text (shipped default: data/calibration.txt, see data/SOURCE.md)
- pipeline:    the layer-by-layer driver: each layer runs on the calibration batch with the
               already-quantized earlier layers; memory stays near one layer plus activations
RTN with a searched clipping range lives in llmpack.formats.quant (the reader shares it).
"""
from .options import BITS, METHODS, QuantOptions

__all__ = ["BITS", "METHODS", "QuantOptions"]
