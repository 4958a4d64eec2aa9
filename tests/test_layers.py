"""The three layers and their one direction (docs/architecture.md), read from the code's own
imports: the core knows nothing of HTTP, storage, jobs, the server or training; training
builds on the core only; the server may use both."""
import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER_ONLY = {"flask", "werkzeug", "requests", "sqlite3", "subprocess", "fcntl", "gunicorn", "orjson"}


def imports_of(path: str, package: str) -> set[str]:
    """Absolute module names imported by a file (relative imports resolved against ``package``)."""
    tree = ast.parse(open(path).read(), path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                out.add(".".join(base + ([node.module] if node.module else [])))
            else:
                out.add(node.module)
    return out


def modules(folder: str, package: str):
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if name.endswith(".py"):
            yield name, imports_of(os.path.join(ROOT, folder, name), package)


def test_the_core_imports_no_server_training_http_or_storage():
    for name, mods in modules("ihp_backend/core", "ihp_backend.core"):
        for m in mods:
            top = m.split(".")[0]
            assert top not in SERVER_ONLY, f"core/{name} imports {m}"
            assert top != "model_training", f"core/{name} imports {m}"
            if top == "ihp_backend":
                assert m.startswith("ihp_backend.core"), f"core/{name} imports the server module {m}"


def test_training_builds_on_the_core_only():
    for name, mods in modules("model_training", "model_training"):
        for m in mods:
            if m.split(".")[0] == "ihp_backend":
                assert m.startswith("ihp_backend.core"), f"model_training/{name} imports the server module {m}"
            # (requests and subprocess are fine here: the evaluator is an HTTP client of a running
            # backend, pose_labels runs the mediapipe tool venv)
            assert m.split(".")[0] not in SERVER_ONLY - {"subprocess", "requests"}, \
                f"model_training/{name} imports {m}"
