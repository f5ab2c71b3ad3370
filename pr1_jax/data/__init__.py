"""Data: PR1's file formats, synthetic data sets, the grain input pipeline, statistics.

    files = synthetic.write_grounding(tmp, n=256, seed=0)               # PNGs + grounding.json
    examples, report = readers.read(files.path, "grounding", image_dir=files.image_dir)
    it = pipeline.make_iterator(examples, seed=0, num_epochs=1, prepare=prepare_fn)
    stats.perceptual_perplexity(examples, "grounding")                  # 1 for grounding

Modules: `synthetic` (generators), `readers` (JSON/JSONL/YAML/HF/TFDS → example dicts +
`ReadReport`), `pipeline` (grain: shard, shuffle, epochs, prepare, checkpointable
iterator that skips bad images), `stats` (perceptual perplexity, `python -m pr1_jax.data.stats`).
`pipeline` imports grain and `processing.image`; import it explicitly.
"""

from pr1_jax.data.readers import TASKS, ReadReport, read

__all__ = ["TASKS", "ReadReport", "read"]
