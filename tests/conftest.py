import os

import torch

# Without a GPU the Triton kernels run in the interpreter, which has to be chosen before
# any @triton.jit function is created (i.e. before kernels.* modules are imported).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
