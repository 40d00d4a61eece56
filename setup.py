"""Only the package list lives here: every folder with an __init__.py under agent/ and firstboot/
is a subpackage of hearth / hearth_firstboot (pyproject.toml maps the folders to the import names)."""

from pathlib import Path

from setuptools import setup

ROOTS = {"hearth": "agent", "hearth_firstboot": "firstboot", "hearth.profiles": "profiles"}


def packages() -> list[str]:
    """Import names of every package folder under the mapped roots."""
    found = []
    for name, folder in ROOTS.items():
        for init in sorted(Path(folder).rglob("__init__.py")):
            rel = init.parent.relative_to(folder).parts
            found.append(".".join((name, *rel)))
    return found


setup(packages=packages())
