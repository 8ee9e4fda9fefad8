"""The values users choose among, in one torch-free place: the CLI lists them in ``--help`` and
checks them without importing the operations, and the operations validate against the same tuples."""

#: compose: methods that combine the factors and never form a dense ΔW.
FACTORED_METHODS = ("cat", "svd", "linear")
#: compose: methods that act entry by entry on each module's dense ΔW.
DENSE_METHODS = ("ties", "dare_linear", "dare_ties", "magnitude_prune")
COMPOSE_METHODS = FACTORED_METHODS + DENSE_METHODS
#: compose: what a dense method's result is kept as.
RESULT_KINDS = ("lora", "sparse", "dense")
#: extract: what becomes of embeddings and output heads.
EMBEDDING_CHOICES = ("auto", "skip", "lora", "full")
#: extract: the SVD methods.
SVD_METHODS = ("auto", "exact", "gram", "randomized")
#: export-onnx: the tasks (their graphs and inputs: surgeon.onnx_tasks); those beyond text named as optimum names them.
EXPORT_TASKS = (
    "causal-lm",
    "masked-lm",
    "sequence-classification",
    "feature-extraction",
    "image-classification",
    "image-feature-extraction",
    "zero-shot-image-classification",
    "text2text-generation",
    "automatic-speech-recognition",
)
EXPORTERS = ("auto", "dynamo", "legacy")
