"""README's snippet for captioning an image file runs as written, with the tiny model type in
place of mini and a checkpoint of a tiny model where the main job would have written one."""
import ast
import re
from pathlib import Path

import torch
from lavis.models import load_model

from lavis_evlgen.common.checkpoint import save_checkpoint, trainable_state_dict
from lavis_evlgen.datasets.shapes_world import ensure_shapes_world

README = Path(__file__).resolve().parents[1] / "README.md"
MINI = 'load_model_and_preprocess("evlgen_vicuna", "mini"'


def models_snippet() -> str:
    """The one python block of README's "## Models" section."""
    section = README.read_text().split("\n## Models\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    return code


def test_readme_snippet_captions_an_image_file_with_the_trained_checkpoint(tmp_path, monkeypatch, capsys):
    code = models_snippet()
    assert code.count(MINI) == 1, f"README's snippet no longer calls {MINI}...)"

    torch.manual_seed(0)
    trained = load_model("evlgen_vicuna", "tiny")
    with torch.no_grad():
        trained.llm_proj.weight.normal_()  # unlike a freshly built model's
    job = tmp_path / "output/evlgen/mini/seed0/train/20260101000000"  # run_mini.py's layout
    job.mkdir(parents=True)
    save_checkpoint({"model": trainable_state_dict(trained)}, job / "checkpoint_best.pth")
    ensure_shapes_world(seed=0, num_train=4, num_val=2, num_test=2)  # in the test cache
    monkeypatch.chdir(tmp_path)

    namespace = {}
    exec(compile(code.replace(MINI, MINI.replace('"mini"', '"tiny"')), str(README), "exec"), namespace)

    assert torch.equal(namespace["model"].llm_proj.weight, trained.llm_proj.weight)
    captions, answers = (ast.literal_eval(line) for line in capsys.readouterr().out.strip().splitlines()[-2:])
    assert len(captions) == 1 and len(answers) == 1
    assert all(isinstance(text, str) for text in captions + answers)
