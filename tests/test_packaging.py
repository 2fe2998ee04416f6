"""Package metadata: pip installs what requirements.txt pins, and the console script is the CLI."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "spectral_diffusion"


def _requirements() -> set[str]:
    lines = (ROOT / "requirements.txt").read_text().splitlines()
    return {re.sub(r"\s+", "", line) for line in lines if line.strip() and not line.lstrip().startswith("#")}


def test_pyproject_dependencies_match_requirements_txt():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(project["build-system"]["requires"]), "pip install . needs a build system"
    assert {re.sub(r"\s+", "", d) for d in project["project"]["dependencies"]} == _requirements()


def test_console_script_is_the_cli(capsys):
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    target = project["project"]["scripts"]["spectral-diffusion"]
    module, _, function = target.partition(":")
    main = getattr(__import__(module, fromlist=[function]), function)
    try:
        main(["--help"])
    except SystemExit as exit_:
        assert exit_.code == 0
    assert "train" in capsys.readouterr().out


def _all_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _imports(path: Path) -> set[str]:
    return {n for n in _all_imports(path) if n.startswith("spectral_diffusion.")}


# Lower layers first; a module may import its own layer and the layers before it, never a later one.
LAYERS = [
    "errors",
    "atomic",
    "images",
    "testing",
    "models",
    "core",
    "formats",
    "library",
    "generation",
    "training",
    "frontends",
]


def _layer(module: str) -> int:
    part = module.split(".")[1]
    return LAYERS.index(part)


def test_imports_point_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(ROOT).with_suffix("")
        parts = relative.parts
        if len(parts) < 2 or parts[1] in ("__init__", "__main__"):
            continue
        own = _layer(".".join(parts))
        for imported in _imports(path):
            if _layer(imported) > own:
                wrong.append(f"{'.'.join(parts)} imports {imported}")
    assert not wrong, wrong


def test_no_gradio_in_the_package():
    """Gradio belongs to the web app (webapp/) alone: the package runs without a web server."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        assert "import gradio" not in text and "from gradio" not in text, path


# The web app's modules, lower first: each imports only the ones before it (and any of the package, whose
# front ends it sits on); the first four hold plain values, text and pictures: testable without gradio.
APP = ROOT / "webapp"
APP_LAYERS = [
    "style",
    "forms",
    "render",
    "drawings",
    "calls",
    "handoff",
    "widgets",
    "handlers",
    "page",
    "layout",
    "layout_generate",
    "events",
    "main",
]
WITHOUT_GRADIO = ("style", "forms", "render", "drawings")
MAX_APP_MODULE_LINES = 300  # one purpose per module: a module past this is doing two things


def _app_modules(path: Path) -> set[str]:
    """The webapp modules ``path`` imports (``from webapp import page`` counts as ``page``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "webapp":
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("webapp."):
            names.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("webapp."))
    return names


def test_the_app_sits_on_the_package_and_its_modules_point_one_way():
    for path in PACKAGE.rglob("*.py"):
        assert not {n.split(".")[0] for n in _all_imports(path)} & {"webapp", "app"}, path
    assert sorted(p.stem for p in APP.glob("*.py")) == sorted(["__init__", *APP_LAYERS])
    wrong = [
        f"webapp.{name} imports webapp.{imported}"
        for name in APP_LAYERS
        for imported in _app_modules(APP / f"{name}.py")
        if APP_LAYERS.index(imported) >= APP_LAYERS.index(name)
    ]
    wrong += [
        f"webapp.{name} imports gradio"
        for name in WITHOUT_GRADIO
        if any(n.split(".")[0] == "gradio" for n in _all_imports(APP / f"{name}.py"))
    ]
    wrong += [
        f"{path.name} has {n} lines"
        for path in APP.glob("*.py")
        if (n := len(path.read_text().splitlines())) > MAX_APP_MODULE_LINES
    ]
    assert not wrong, wrong
    find = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert "webapp*" in find["include"], "pip install -e . makes webapp importable (no sys.path edits)"


def test_public_api_names_resolve():
    import spectral_diffusion

    for name in spectral_diffusion.__all__:
        assert getattr(spectral_diffusion, name) is not None, name
    assert spectral_diffusion.Studio.__module__ == "spectral_diffusion.generation.fusion"
