"""The ``visrec`` subcommands, one module per group; option help shared by several lives here."""

PROVIDERS_HELP = ("ONNX Runtime execution providers of an ONNX model: cpu (default) | cuda[:N] | tensorrt[:N] | "
                  "auto (TensorRT > CUDA > CPU, whichever onnxruntime has) | provider names, comma-separated; "
                  "cuda and tensorrt need the gpu extra, onnxruntime-gpu (docs/cli.md)")
