"""Importing the plugin and using LAVIS through it shows none of LAVIS's own deprecation warnings,
while the same deprecations from any other code still show."""
import json
import subprocess
import sys
import textwrap

PROBE = textwrap.dedent(r'''
import json
import warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lavis_evlgen
    import torch
    from lavis.models import load_model

    load_model("evlgen_vicuna", "tiny", is_eval=True)
    # LAVIS's train loop enters torch.cuda.amp.autocast at every step (lavis/tasks/base_task.py).
    exec("torch.cuda.amp.autocast(enabled=False)", {"__name__": "lavis.tasks.base_task", "torch": torch})
    mark = len(caught)
    # The same deprecated calls from anyone else's code.
    torch.cuda.amp.autocast(enabled=False)

    def add_one(x):
        return x + 1

    torch.jit.script(add_one)
print(json.dumps([{"category": w.category.__name__, "message": str(w.message), "before_mark": i < mark}
                  for i, w in enumerate(caught)]))
''')


def test_no_lavis_deprecation_warnings_but_others_still_show(tmp_path):
    probe = tmp_path / "probe.py"  # a file: torch.jit.script reads the function's source
    probe.write_text(PROBE)
    result = subprocess.run([sys.executable, str(probe)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    caught = json.loads(result.stdout.strip().splitlines()[-1])
    deprecations = [w for w in caught if w["category"] in ("FutureWarning", "DeprecationWarning")]
    assert [w for w in deprecations if w["before_mark"]] == []
    assert [w["message"].split(" is deprecated")[0] for w in deprecations] == [
        "`torch.cuda.amp.autocast(args...)`", "`torch.jit.script`"]
