"""Loading a spec and everything it `use`s: the standard library (`use std.gpus`) and files
relative to the importing file (`use "common.flow"`). Cycles, missing modules and files outside
the root spec's directory tree are errors (F0205-F0207); `outside_tree` is the rule for every
file a spec names, `use` and `trace` alike."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from flowc.compiler.diagnostics import Diagnostic, FlowError, did_you_mean
from flowc.compiler.frontend import ast
from flowc.compiler.frontend.parser import MAX_ERRORS, MAX_SOURCE_CHARS, capped, parse
from flowc.compiler.source import SourceFile, Span

STD_PREFIX = "std."


@dataclass
class Program:
    """Every module of a spec, dependencies first, and what each one can see."""

    modules: list[ast.Module] = field(default_factory=list)
    sources: dict[str, SourceFile] = field(default_factory=dict)
    imports: dict[str, list[str]] = field(default_factory=dict)  # module -> modules it uses directly
    roots: list[str] = field(default_factory=list)
    # module -> the directory tree the files it names must stay in: its root spec's directory
    # (the working directory for spec text); none for the standard library
    trees: dict[str, Path] = field(default_factory=dict)
    allow_outside: bool = False  # whether files outside those trees may be read

    def visible(self, module: str) -> set[str]:
        """The module and everything it imports, transitively."""
        seen, stack = set(), [module]
        while stack:
            current = stack.pop()
            if current not in seen:
                seen.add(current)
                stack.extend(self.imports.get(current, []))
        return seen


@functools.cache
def _parse_std(source: SourceFile) -> ast.Module:
    """The standard library never changes while flowc runs: parse each module once."""
    return parse(source)


@functools.cache
def std_modules() -> tuple[str, ...]:
    names = [p.name[:-5] for p in resources.files("flowc.stdlib").iterdir() if p.name.endswith(".flow")]
    return tuple(sorted(names + ["cpu_local"]))


def std_source(module: str) -> SourceFile | None:
    """A standard library module's text, None when there is no such module. `module` is user
    text: it is looked up among the modules before it names a file."""
    return _std_source(module) if module in std_modules() else None


@functools.cache
def _std_source(module: str) -> SourceFile:
    display = f"<std>/{module}.flow"
    if module == "cpu_local":
        from flowc.compiler.frontend.cpu_local import cpu_local_flow

        return SourceFile(display, cpu_local_flow())
    return SourceFile(display, resources.files("flowc.stdlib").joinpath(f"{module}.flow").read_text(encoding="utf-8"))


def locate(base: Path, name: str) -> tuple[Path | None, str | None]:
    """Resolve a file name a spec gives (`use "x.flow"`, `trace "t.csv"`) against `base`: (the
    path, None) for a file, (the path, "no such file") when there is none, and (None, why) for a
    name no file can have, since the name is user text: a NUL character, a name too long."""
    if "\0" in name:
        return None, "a file name cannot contain a NUL character"
    try:
        path = (base / name).resolve()
        return path, (None if path.is_file() else "no such file")
    except RuntimeError:  # how pathlib reports a loop of symbolic links
        return None, "a loop of symbolic links"
    except OSError as error:  # ENAMETOOLONG, EACCES, ...
        return None, error.strerror or str(error)


def outside_tree(path: Path, name: str, span: Span | None, root: Path, allow_outside: bool) -> Diagnostic | None:
    """F0207 when the file a spec names as `name` lies outside `root`, the root spec's directory
    tree, once every symbolic link on the way is resolved; None when it is inside or
    `allow_outside` lifts the rule. Specs travel between people and CI systems: they must not
    read, or reveal anything of, files elsewhere on the machine."""
    resolved = path.resolve()
    if allow_outside or resolved.is_relative_to(root):
        return None
    return Diagnostic(
        "F0207", f"`{name}` is outside the spec's directory tree", span, f"resolves to {display_path(resolved)}",
        "move the file under the spec's directory, or pass --allow-outside (`allow_outside=True` in Python)",
        notes=(f"the spec's directory is {display_path(root)}",),
    )


def display_path(path: Path) -> str:
    """Paths in diagnostics: relative to the working directory when below it, else absolute."""
    path = Path(path).resolve()
    cwd = Path.cwd().resolve()
    return str(path.relative_to(cwd)) if path.is_relative_to(cwd) else str(path)


class _Loader:
    def __init__(self, allow_outside: bool):
        self.allow_outside = allow_outside
        self.program = Program(allow_outside=allow_outside)
        self.errors: list[Diagnostic] = []
        self.done: set[str] = set()
        self.stack: list[tuple[str, Span | None]] = []

    def load_file(self, path: Path, root: Path, via: Span | None = None) -> str | None:
        key = display_path(path)
        if key in self.done:
            return key
        if self._cycle(key, via):
            return None
        try:
            with path.open(encoding="utf-8") as file:  # one character past the limit is enough to refuse it
                text = file.read(MAX_SOURCE_CHARS + 1)
        except UnicodeDecodeError:
            self.errors.append(Diagnostic("F0205", f"`{key}` is not a UTF-8 text file", via, "imported here"))
            return None
        except OSError as error:
            self.errors.append(Diagnostic("F0205", f"cannot read `{key}`: {error.strerror}", via, "imported here"))
            return None
        self._load(SourceFile(key, text), root, via)
        return key

    def load_std(self, module: str, via: Span | None) -> str | None:
        source = std_source(module)
        if source is None:
            return None
        if source.name in self.done:
            return source.name
        if self._cycle(source.name, via):
            return None
        self._load(source, None, via)
        return source.name

    def load_text(self, source: SourceFile, root: Path) -> None:
        self._load(source, root, None)

    def _cycle(self, key: str, via: Span | None) -> bool:
        names = [name for name, _ in self.stack]
        if key not in names:
            return False
        chain = names[names.index(key):] + [key]
        self.errors.append(Diagnostic(
            "F0206", "import cycle: " + " -> ".join(chain), via, "this `use` closes the cycle",
            "move what both files need into a third file that both `use`",
        ))
        return True

    def _load(self, source: SourceFile, root: Path | None, via: Span | None) -> None:
        """Parse a module (root is None for the standard library) and load what it uses."""
        self.program.sources[source.name] = source
        if root is not None:
            self.program.trees[source.name] = root
        try:
            module = _parse_std(source) if root is None else parse(source)
        except FlowError as error:
            self.errors.extend(error.diagnostics)
            self.done.add(source.name)
            return
        self.stack.append((source.name, via))
        uses = []
        for use in module.uses:
            if len(self.errors) >= MAX_ERRORS:
                break
            target = self._resolve(use, source, root)
            if target:
                uses.append(target)
        self.stack.pop()
        self.program.imports[source.name] = uses
        self.program.modules.append(module)
        self.done.add(source.name)

    def _resolve(self, use: ast.Use, importer: SourceFile, root: Path | None) -> str | None:
        target = use.target
        if isinstance(target, ast.Name):
            name = target.text
            if not name.startswith(STD_PREFIX):
                self.errors.append(Diagnostic(
                    "F0205", f"cannot import `{name}`", target.span, "not a module",
                    f'import the standard library as `use std.{name}` or a file as `use "{name}.flow"`'
                    if f"{name}" in std_modules() else f'import a file with a string: `use "{name}.flow"`',
                ))
                return None
            module = name[len(STD_PREFIX):]
            loaded = self.load_std(module, use.span)
            if loaded is None and module not in std_modules():
                best = did_you_mean(module, std_modules())
                self.errors.append(Diagnostic(
                    "F0205", f"no standard library module `{name}`", target.span, "not found",
                    f"did you mean `std.{best}`?" if best else
                    "standard library modules are: " + ", ".join(f"`std.{m}`" for m in std_modules()),
                ))
            return loaded
        if root is None:  # the standard library imports only the standard library
            self.errors.append(Diagnostic("F0205", "standard library modules cannot import files", target.span))
            return None
        relative = Path(target.value)
        base = Path(importer.name).parent if not importer.name.startswith("<") else Path.cwd()
        path, problem = locate(base, target.value)
        if path is None:
            self.errors.append(Diagnostic("F0205", f"cannot import `{target.value}`", target.span, problem,
                                          "give the path of a .flow file, relative to this file's directory"))
            return None
        outside = outside_tree(path, target.value, target.span, root, self.allow_outside)
        if outside is not None:
            self.errors.append(outside)
            return None
        if problem:
            # names of the folder only inside the tree: a listing of any other reveals the machine
            listable = path.parent.is_relative_to(root) and path.parent.is_dir()
            near = [p.name for p in path.parent.glob("*.flow")] if listable else []
            best = did_you_mean(path.name, near)
            self.errors.append(Diagnostic(
                "F0205", f"cannot find `{target.value}`", target.span, "no such file",
                f'did you mean `"{(relative.parent / best).as_posix()}"`?' if best else
                f"paths are relative to the importing file's directory ({display_path(base.resolve()) or '.'})",
            ))
            return None
        return self.load_file(path, root, use.span)


def load_program(paths: list[Path] | None = None, text: SourceFile | None = None, *,
                 allow_outside: bool = False) -> Program:
    """Parse the given files (or text) and everything they import. Raises FlowError with all
    syntax and import errors found."""
    loader = _Loader(allow_outside)
    for path in paths or []:
        root = path.resolve().parent
        key = loader.load_file(path.resolve(), root)
        if key:
            loader.program.roots.append(key)
    if text is not None:
        loader.load_text(text, Path.cwd().resolve())
        loader.program.roots.append(text.name)
    if loader.errors:
        raise FlowError(capped(loader.errors), loader.program.sources)
    return loader.program


__all__ = ["Program", "load_program", "outside_tree", "std_modules", "std_source"]
