"""A published script version's function: the platform's ScriptFunction over this folder's script.py
and meta.json (customscripts/faas/script_function.py). Importing this module starts the sandbox, so
the server that imports it reports ready only once the first request is warm."""

from pathlib import Path

from customscripts.faas.script_function import ScriptFunction

function = ScriptFunction.start(Path(__file__).resolve().parent)
handle = function.handle
# its ops listener (faas/runner.py): cs_component_up{component="script-function"}; ready when its sandbox and
# gateway-fn answer
COMPONENT, READINESS = "script-function", function.readiness()
