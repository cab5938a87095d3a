"""The demo's held-out evaluation (training/demo_eval.py) of a checkpoint as it is, with no training step: e.g. the
base of the CPU demo's LoRA variant (configs/demo_cpu_lora.py) on colour questions it never saw.

    python bench/demo_base_eval.py /tmp/qwen2vl-demo3/export /tmp/qwen2vl-demo-lora-base [--config.FIELD=...]

Writes the config's demo set (data.demo_set) into WORKDIR/data unless data.data_dir points at one, then
WORKDIR/demo_eval.json and demo.png; prints the result."""
import json
import sys
import types

from absl import app
from ml_collections import config_flags

from configs.demo_cpu_lora import get_config


def main(argv):
    init_from, workdir = argv[1:3]
    from qwen2vl_jax.checkpoint.load import load
    from training.demo_eval import evaluate_demo
    from training.train import model_and_processor, prepare_workdir

    config = flags_config.value
    with config.unlocked():
        config.init_from, config.lora.rank = init_from, 0  # the checkpoint alone
    prepare_workdir(config, workdir)
    model_config, processor = model_and_processor(config, workdir)
    params = load(init_from, dtype=model_config.param_dtype, scan_layers=model_config.scan_layers)[1]
    result = evaluate_demo(config, workdir, model_config, processor, types.SimpleNamespace(params=params))
    print(json.dumps(result, indent=2))


flags_config = config_flags.DEFINE_config_dict("config", get_config())

if __name__ == "__main__":
    app.run(main, argv=sys.argv)
