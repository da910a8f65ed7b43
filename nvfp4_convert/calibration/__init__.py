"""Calibration: activation statistics from real text, collected one decoder layer at a time.

``data`` reads and tokenizes the text, ``layers`` builds the model with transformers' own classes one decoder
layer at a time, ``collect`` records each quantized Linear's input statistics, ``input_scales`` turns them
into ModelOpt's ``input_scale``. This module itself imports nothing heavy (the CLI reads its defaults).
"""

SAMPLES = 128  # 128 x 2048 = 262k tokens: the usual GPTQ/AWQ calibration budget
SEQ_LEN = 2048
METHOD = ("max calibration (ModelOpt semantics), one decoder layer at a time with full-precision upstream "
          "layers; input_scale = amax / (6 * 448)")
