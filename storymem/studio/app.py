"""``storymem studio``: the web page (Gradio) over :class:`~storymem.studio.handlers.Studio`.

    storymem studio                                   # the bundled small model, on the CPU, offline
    storymem studio --base Wan-AI/Wan2.2-I2V-A14B-Diffusers --lora ./adapter --t2v-model ...   # as `render`

Tabs: **Story** (open / upload / write a story as a table of shots, checked before any render), **Render**
(start, stop, resume; progress per shot and step; each shot's video, the memory it saw and the keyframes it
gave as they land), **Memory** (the bank a shot is drawn from: remove, pin, add reference images; re-render
from there), **Takes** (every version of a shot; pick the one the story continues from).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Optional, Sequence

__all__ = ["build_app", "build_page", "main"]


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise SystemExit("storymem studio needs Gradio: pip install \"storymem[studio]\"") from None
    return gr


def _say(text: str, error: bool = False) -> str:
    """The page's message line."""
    colour = "#dc2626" if error else "inherit"
    return f'<div id="sm-message" data-error="{int(error)}" style="color:{colour}">{_escape(text)}</div>'


def _draft(name, overview, rows):
    from .stories import StoryDraft

    return StoryDraft(name or "", overview or "", [list(r) for r in (rows or [])])


def _shot_choices(state: dict) -> tuple[list, list]:
    """(memory radio: shots 2.. whose bank is saved, takes radio: the finished shots) of a run."""
    manifest = state.get("manifest")
    if not manifest:
        return [], []
    entries = manifest.get("shots", [])
    total = manifest.get("num_shots", len(entries))
    memory = [(f"shot {i + 1}", i + 1) for i in range(1, min(len(entries) + 1, total))]
    takes = [(f"shot {i + 1} · {e['stem']}", e["stem"]) for i, e in enumerate(entries)]
    return memory, takes


def _model_line(studio) -> str:
    o = studio.options.render
    size = f"{o.height}x{o.width}" if o.height else f"area {o.area}"
    adapter = f" + adapter {o.lora}" if o.lora else ""
    return f"{o.base}{adapter} &middot; {o.device or 'auto device'} &middot; {size}, {o.frames} frames, {o.steps} steps"


def _layout(gr, studio) -> SimpleNamespace:
    """Every component of the page (inside the Blocks being built), by name."""
    from .stories import COLUMNS
    from .views import edits_html, issues_html, progress_html, shots_html

    ui = SimpleNamespace()
    gr.HTML(f"<h2 style='margin:0'>storymem studio</h2><div>workspace <code>{_escape(str(studio.workspace.root))}"
            f"</code> &middot; {_model_line(studio)}</div>")
    with gr.Row():
        ui.run = gr.Textbox(label="Run folder (runs/NAME in the workspace)", value="my-story", elem_id="sm-run",
                            scale=3)
        ui.runs = gr.Dropdown(label="Open a run", choices=studio.workspace.runs(), value=None, elem_id="sm-runs",
                              scale=3)
        ui.refresh_runs = gr.Button("Refresh list", scale=1)
    ui.message = gr.HTML(_say(""), elem_id="sm-message-box")
    ui.last_shots, ui.last_version = gr.State(""), gr.State("")
    with gr.Tabs():
        with gr.Tab("Story", id="story"):
            with gr.Row():
                ui.stories = gr.Dropdown(label="Stories in the workspace", choices=studio.workspace.stories(),
                                         value=None, scale=3)
                ui.open_story = gr.Button("Open", scale=1)
                ui.upload_story = gr.UploadButton("Upload a story (.json / .txt)", file_types=[".json", ".txt"],
                                                  type="filepath", scale=2)
            ui.name = gr.Textbox(label="Title", value="My story", elem_id="sm-title")
            ui.overview = gr.Textbox(label="Overview", value="", lines=2, elem_id="sm-overview")
            ui.table = gr.Dataframe(
                value=[[1, "cut", "", "", ""]], headers=COLUMNS, type="array", interactive=True, wrap=True,
                label="Shots: one row per shot; cut = a new shot, continue = it continues the previous one",
                datatype=["number", "str", "str", "str", "str"], column_count=(len(COLUMNS), "fixed"),
                static_columns=[4], column_widths=["8%", "12%", "42%", "26%", "12%"], elem_id="sm-table")
            with gr.Row():
                ui.add_shot = gr.Button("Add shot", elem_id="sm-add-shot")
                ui.drop_shot = gr.Button("Remove last shot")
                ui.check = gr.Button("Check story", elem_id="sm-check")
            ui.issues = gr.HTML(issues_html([]), elem_id="sm-issues-box")
            with gr.Row():
                ui.save_name = gr.Textbox(label="Save as (stories/NAME.json)", value="my-story", scale=3)
                ui.save = gr.Button("Save story", scale=1)
            with gr.Accordion("Paste a story (ST-Bench JSON, a JSON list of prompts, or one prompt a line)",
                              open=False):
                ui.pasted = gr.Textbox(lines=6, label="Story text")
                ui.load_pasted = gr.Button("Load into the table")
        with gr.Tab("Render", id="render"):
            with gr.Row():
                ui.render = gr.Button("Render / resume", variant="primary", elem_id="sm-render")
                ui.stop = gr.Button("Stop", variant="stop", elem_id="sm-stop")
                ui.seed = gr.Number(label="Seed", value=studio.options.render.seed, precision=0)
            ui.progress = gr.HTML(progress_html({"state": "idle"}), elem_id="sm-progress-box")
            ui.shots = gr.HTML(shots_html(studio.workspace.root, {"manifest": None}), elem_id="sm-shots-box")
            with gr.Accordion("Resume from a terminal", open=False):
                ui.cli = gr.Code(value="", language="shell", interactive=False, label="storymem render ...")
        with gr.Tab("Memory", id="memory"):
            ui.memory_shot = gr.Radio(label="Re-render from shot (its memory: the bank saved after the shot before)",
                                      choices=[], elem_id="sm-memory-shot")
            ui.bank = gr.HTML("", elem_id="sm-bank-box")
            ui.remove = gr.CheckboxGroup(label="Remove from the memory", choices=[], elem_id="sm-remove")
            ui.pin = gr.CheckboxGroup(label="Pin (keep it always: it becomes a reference image)", choices=[],
                                      elem_id="sm-pin")
            ui.references = gr.File(label="Add reference images", file_count="multiple", file_types=["image"],
                                    type="filepath", elem_id="sm-refs")
            with gr.Row():
                ui.save_edit = gr.Button("Save memory edit", elem_id="sm-save-edit")
                ui.rerender = gr.Button("Re-render from this shot", variant="primary", elem_id="sm-rerender")
            ui.edits = gr.HTML(edits_html([]), elem_id="sm-edits-box")
        with gr.Tab("Takes", id="takes"):
            ui.take_shot = gr.Radio(label="Shot", choices=[], elem_id="sm-take-shot")
            ui.takes_view = gr.HTML("", elem_id="sm-takes-box")
            ui.take = gr.Radio(label="Take the story continues from", choices=[], elem_id="sm-take")
            with gr.Row():
                ui.use_take = gr.Button("Use this take", variant="primary", elem_id="sm-use-take")
                ui.rerender_take = gr.Button("Re-render from this shot", elem_id="sm-take-rerender")
    return ui


def _wire_story(gr, ui, studio) -> None:
    """Story tab: check, add/remove rows, open, upload, paste, save."""
    from .handlers import StudioError
    from .stories import issues_column
    from .views import issues_html
    from .workspace import slug

    def on_check(name, overview, rows):
        story, found = studio.check(_draft(name, overview, rows))
        return issues_column(rows or [], found), issues_html(found, story)

    def on_add(rows):
        rows = [list(r) for r in (rows or [])]
        scene = rows[-1][0] if rows and str(rows[-1][0]).strip() else 1
        return rows + [[scene, "cut", "", "", ""]]

    def loaded(draft, note: str):
        return (draft.name, draft.overview, issues_column(draft.rows, []), issues_html([]), _say(note),
                slug(draft.name))

    def refused(err, extra: int = 0):
        return (gr.skip(),) * 4 + (_say(str(err), True),) + (gr.skip(),) * (1 + extra)

    def on_open(file_name):
        try:
            return loaded(studio.open_story(file_name or ""), f"opened stories/{file_name}")
        except StudioError as err:
            return refused(err)

    def on_upload(path):
        try:
            draft, saved = studio.upload_story(path)
        except StudioError as err:
            return refused(err, 1)
        return loaded(draft, f"uploaded and kept as stories/{saved}") + (
            gr.update(choices=studio.workspace.stories(), value=saved),)

    def on_paste(text):
        try:
            return loaded(studio.import_text(text), "loaded the pasted story")
        except StudioError as err:
            return refused(err)

    def on_save(file_name, name, overview, rows):
        try:
            saved, found = studio.save_story(file_name, _draft(name, overview, rows))
        except StudioError as err:
            return gr.skip(), gr.skip(), _say(str(err), True), gr.skip()
        if saved is None:
            return issues_column(rows, found), issues_html(found), _say("not saved: the story has issues", True), \
                gr.skip()
        return gr.skip(), gr.skip(), _say(f"saved stories/{saved}"), gr.update(choices=studio.workspace.stories(),
                                                                                 value=saved)

    outputs = [ui.name, ui.overview, ui.table, ui.issues, ui.message, ui.save_name]
    ui.check.click(on_check, [ui.name, ui.overview, ui.table], [ui.table, ui.issues])
    ui.add_shot.click(on_add, ui.table, ui.table)
    ui.drop_shot.click(lambda rows: [list(r) for r in (rows or [])][:-1] or [[1, "cut", "", "", ""]], ui.table,
                       ui.table)
    ui.open_story.click(on_open, ui.stories, outputs)
    ui.upload_story.upload(on_upload, ui.upload_story, outputs + [ui.stories])
    ui.load_pasted.click(on_paste, ui.pasted, outputs)
    ui.save.click(on_save, [ui.save_name, ui.name, ui.overview, ui.table], [ui.table, ui.issues, ui.message,
                                                                             ui.stories])


def _wire_render(gr, ui, studio) -> None:
    """Run choice, render / stop, and the once-a-second refresh of progress and shots."""
    from .handlers import StudioError
    from .stories import issues_column
    from .views import edits_html, issues_html, progress_html, shots_html

    root = studio.workspace.root

    def on_open_run(run):
        if not run:
            return (gr.skip(),) * 11
        try:
            draft, state = studio.open_run(run), studio.run_state(run)
        except StudioError as err:
            return (gr.skip(),) * 4 + (_say(str(err), True),) + (gr.skip(),) * 6
        memory_choices, take_choices = _shot_choices(state)
        return (draft.name, draft.overview, issues_column(draft.rows, []), issues_html([]),
                _say(f"opened run {run}"), run, shots_html(root, state, studio.progress()),
                gr.update(choices=memory_choices, value=None), gr.update(choices=take_choices, value=None),
                edits_html(state["edits"]), studio.cli_command(run))

    def on_render(run, name, overview, rows, seed):
        draft = _draft(name, overview, rows)
        story, found = studio.check(draft)
        if story is None:
            return issues_column(rows or [], found), issues_html(found), _say(
                "fix the story first (see the check column)", True), gr.skip()
        try:
            note = studio.start_render(run, draft, seed=_int(seed))
        except StudioError as err:
            return gr.skip(), issues_html([], story), _say(str(err), True), gr.skip()
        return gr.skip(), issues_html([], story), _say(note), gr.update(choices=studio.workspace.runs())

    def on_tick(run, shown, version):
        """Progress always; the shots only when their page changed (videos would restart); the run's choices
        only when its manifest or edits changed."""
        status = studio.progress()
        progress = progress_html(status)
        try:
            state = studio.run_state(run)
        except StudioError:
            return (progress, gr.skip(), shown) + (gr.skip(),) * 4 + (version,)
        page = shots_html(root, state, status)
        shots = gr.skip() if page == shown else page
        manifest = state.get("manifest") or {}
        now = f"{manifest.get('updated')}|{len(manifest.get('shots', []))}|{len(state['edits'])}"
        if now == version:
            return (progress, shots, page) + (gr.skip(),) * 4 + (version,)
        memory_choices, take_choices = _shot_choices(state)
        return (progress, shots, page, gr.update(choices=memory_choices), gr.update(choices=take_choices),
                edits_html(state["edits"]), studio.cli_command(run), now)

    ui.runs.change(on_open_run, ui.runs, [ui.name, ui.overview, ui.table, ui.issues, ui.message, ui.run, ui.shots,
                                          ui.memory_shot, ui.take_shot, ui.edits, ui.cli])
    ui.refresh_runs.click(lambda: gr.update(choices=studio.workspace.runs()), None, ui.runs)
    ui.render.click(on_render, [ui.run, ui.name, ui.overview, ui.table, ui.seed],
                    [ui.table, ui.issues, ui.message, ui.runs])
    ui.stop.click(lambda: _say(studio.stop()), None, ui.message)
    gr.Timer(1.0).tick(on_tick, [ui.run, ui.last_shots, ui.last_version],
                       [ui.progress, ui.shots, ui.last_shots, ui.memory_shot, ui.take_shot, ui.edits, ui.cli,
                        ui.last_version], show_progress="hidden")


def _start_from(studio, run, shot, seed) -> str:
    """Re-render the run's own story from ``shot`` (1-based)."""
    from .handlers import StudioError

    if not shot:
        return _say("choose a shot first", True)
    try:
        return _say(studio.start_render(run, studio.open_run(run), seed=_int(seed), from_shot=int(shot)))
    except StudioError as err:
        return _say(str(err), True)


def _wire_memory(gr, ui, studio) -> None:
    """Memory tab: the bank a shot is drawn from; remove / pin / add; re-render from there."""
    from .handlers import StudioError
    from .views import bank_html, edits_html

    def on_shot(run, shot):
        empty = gr.update(choices=[], value=[])
        if not shot:
            return "", empty, empty
        try:
            items = studio.memory(run, int(shot))
        except StudioError as err:
            return _say(str(err), True), empty, empty
        choices = [(item.label, item.key) for item in items]
        keyframes = [c for c, item in zip(choices, items) if item.kind == "keyframe"]
        return bank_html(items, int(shot)), gr.update(choices=choices, value=[]), gr.update(choices=keyframes,
                                                                                             value=[])

    def on_save(run, shot, remove, pin, files):
        if not shot:
            return (_say("choose the shot to re-render first", True),) + (gr.skip(),) * 5
        try:
            record = studio.edit_memory(run, int(shot), remove or [], pin or [], files or [])
        except StudioError as err:
            return (_say(str(err), True),) + (gr.skip(),) * 5
        note = f"memory edit #{record['id']} saved: shot {int(shot)} on will be drawn from it when you re-render"
        return (_say(note), *on_shot(run, shot), None, edits_html(studio.run_state(run)["edits"]))

    ui.memory_shot.change(on_shot, [ui.run, ui.memory_shot], [ui.bank, ui.remove, ui.pin], show_progress="hidden")
    ui.save_edit.click(on_save, [ui.run, ui.memory_shot, ui.remove, ui.pin, ui.references],
                       [ui.message, ui.bank, ui.remove, ui.pin, ui.references, ui.edits])
    ui.rerender.click(lambda run, shot, seed: _start_from(studio, run, shot, seed), [ui.run, ui.memory_shot, ui.seed],
                      ui.message)


def _wire_takes(gr, ui, studio) -> None:
    """Takes tab: every take of a shot; pick the one the story continues from."""
    from .handlers import StudioError
    from .views import takes_html

    def on_shot(run, stem):
        if not stem:
            return "", gr.update(choices=[], value=None)
        try:
            index, state = studio.takes(run, stem), studio.run_state(run)
        except (StudioError, ValueError) as err:
            return _say(str(err), True), gr.update(choices=[], value=None)
        choices = [(f"take {t['take']}" + (" (current)" if t["take"] == index.get("current") else ""), t["take"])
                   for t in index.get("takes", [])]
        return (takes_html(studio.workspace.root, state["folder"], stem, index, state["edits"]),
                gr.update(choices=choices, value=index.get("current")))

    def on_use(run, stem, take):
        if not stem or not take:
            return _say("choose a shot and a take", True), gr.skip(), gr.skip()
        try:
            note = studio.pick_take(run, stem, int(take))
        except StudioError as err:
            return _say(str(err), True), gr.skip(), gr.skip()
        return (_say(note), *on_shot(run, stem))

    def on_rerender(run, stem, seed):
        state = studio.run_state(run) if stem else {}
        stems = [e["stem"] for e in (state.get("manifest") or {}).get("shots", [])]
        if stem not in stems:
            return _say("choose a rendered shot", True)
        return _start_from(studio, run, stems.index(stem) + 1, seed)

    ui.take_shot.change(on_shot, [ui.run, ui.take_shot], [ui.takes_view, ui.take], show_progress="hidden")
    ui.use_take.click(on_use, [ui.run, ui.take_shot, ui.take], [ui.message, ui.takes_view, ui.take])
    ui.rerender_take.click(on_rerender, [ui.run, ui.take_shot, ui.seed], ui.message)


def build_page(studio):
    """The Gradio Blocks of the page, wired to ``studio``."""
    gr = _gradio()
    with gr.Blocks(title="storymem studio", analytics_enabled=False) as page:
        ui = _layout(gr, studio)
        _wire_story(gr, ui, studio)
        _wire_render(gr, ui, studio)
        _wire_memory(gr, ui, studio)
        _wire_takes(gr, ui, studio)
    return page


def _int(value) -> Optional[int]:
    try:
        return None if value is None or value == "" else int(value)
    except (TypeError, ValueError):
        return None


def _escape(text: str) -> str:
    import html

    return html.escape(str(text))


def build_app(studio):
    """The ASGI app: the page at / and the workspace's files at /studio/file/ (confined to the workspace)."""
    gr = _gradio()
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import FileResponse

    from .views import FILE_ROUTE, PAGE_CSS
    from .workspace import WorkspaceError

    app = FastAPI(title="storymem studio", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get(FILE_ROUTE + "{name:path}")
    def workspace_file(name: str):
        try:
            path = studio.workspace.resolve(name, must_exist=True)
        except WorkspaceError as err:
            raise HTTPException(status_code=404, detail=str(err)) from None
        if not path.is_file():
            raise HTTPException(status_code=404, detail=f"{name}: not a file")
        return FileResponse(path)

    theme = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])
    return gr.mount_gradio_app(app, build_page(studio), path="/", theme=theme, css=PAGE_CSS,
                               max_file_size="32mb", ssr_mode=False, show_error=True, footer_links=[])


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``storymem studio``; returns the exit code (0 after a clean shutdown, 2 for bad flags)."""
    import socket

    from ..render import RenderError
    from .handlers import Studio
    from .runner import parse_args
    from .workspace import WorkspaceError

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        options = parse_args(argv)
    except SystemExit as exit_:
        return int(exit_.code or 0)
    except (RenderError, WorkspaceError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        print('error: storymem studio needs Gradio: pip install "storymem[studio]"', file=sys.stderr)
        return 2
    # Uploads land inside the workspace, and the page never phones home.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        workspace_root = Path(options.workspace).expanduser()
        workspace_root.mkdir(parents=True, exist_ok=True)
        upload_dir = workspace_root.resolve() / ".studio" / "uploads"
        # Uploads of earlier sessions were copied where they belong once checked (stories/, edits/): drop them.
        shutil.rmtree(upload_dir, ignore_errors=True)
        upload_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        print(f"error: --workspace {options.workspace}: {err}", file=sys.stderr)
        return 2
    os.environ["GRADIO_TEMP_DIR"] = str(upload_dir)
    import uvicorn

    sock = socket.socket(socket.AF_INET6 if ":" in options.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((options.host, options.port))
    except OSError as err:
        print(f"error: cannot serve on {options.host}:{options.port}: {err}", file=sys.stderr)
        return 2
    port = sock.getsockname()[1]
    url = f"http://{options.host}:{port}/"
    try:
        studio = Studio(options, url=url)
    except (WorkspaceError, OSError) as err:
        print(f"error: --workspace {options.workspace}: {err}", file=sys.stderr)
        return 2
    studio.upload_roots.append(upload_dir)
    app = build_app(studio)
    print(f"storymem studio: {url}  (workspace {studio.workspace.root}; Ctrl+C to quit)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass
    finally:
        if studio.runner.busy:
            print("stopping the render (finished shots are kept)...", file=sys.stderr)
            studio.runner.stop(wait=60)
    return 0
