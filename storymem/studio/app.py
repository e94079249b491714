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
import sys
from pathlib import Path
from typing import Optional, Sequence

__all__ = ["build_app", "build_page", "main"]


def _gradio():
    try:
        import gradio as gr
    except ImportError:
        raise SystemExit("storymem studio needs Gradio: pip install \"storymem[studio]\"") from None
    return gr


def build_page(studio):
    """The Gradio Blocks of the page, wired to ``studio``."""
    gr = _gradio()
    from .handlers import StudioError
    from .stories import COLUMNS, StoryDraft, issues_column
    from .views import bank_html, edits_html, issues_html, progress_html, shots_html, takes_html
    from .workspace import slug

    root = studio.workspace.root
    template = studio.options.render
    size = f"{template.height}x{template.width}" if template.height else f"area {template.area}"
    model = (f"{template.base}" + (f" + adapter {template.lora}" if template.lora else "") +
             f" &middot; {template.device or 'auto device'} &middot; {size}, {template.frames} frames, "
             f"{template.steps} steps")

    def draft_of(name, overview, rows) -> StoryDraft:
        return StoryDraft(name or "", overview or "", [list(r) for r in (rows or [])])

    def say(text: str, error: bool = False) -> str:
        colour = "#dc2626" if error else "inherit"
        return f'<div id="sm-message" data-error="{int(error)}" style="color:{colour}">{_escape(text)}</div>'

    def shot_choices(state) -> tuple[list, list]:
        """(memory radio choices: shots 2.. whose bank exists, takes radio choices: finished shots)."""
        manifest = state.get("manifest")
        if not manifest:
            return [], []
        entries = manifest.get("shots", [])
        stems = [e["stem"] for e in entries]
        total = manifest.get("num_shots", len(entries))
        memory = [(f"shot {i + 1}", i + 1) for i in range(1, min(len(entries) + 1, total))]
        takes = [(f"shot {i + 1} · {stem}", stem) for i, stem in enumerate(stems)]
        return memory, takes

    with gr.Blocks(title="storymem studio", analytics_enabled=False) as page:
        gr.HTML(f"<h2 style='margin:0'>storymem studio</h2><div>workspace <code>{_escape(str(root))}</code> "
                f"&middot; {model}</div>")
        with gr.Row():
            run = gr.Textbox(label="Run folder (runs/NAME in the workspace)", value="my-story", elem_id="sm-run",
                             scale=3)
            runs = gr.Dropdown(label="Open a run", choices=studio.workspace.runs(), value=None, elem_id="sm-runs",
                               scale=3, allow_custom_value=False)
            refresh_runs = gr.Button("Refresh list", scale=1)
        message = gr.HTML(say(""), elem_id="sm-message-box")
        last_shots = gr.State("")
        last_version = gr.State("")

        with gr.Tabs():
            with gr.Tab("Story", id="story"):
                with gr.Row():
                    stories = gr.Dropdown(label="Stories in the workspace", choices=studio.workspace.stories(),
                                          value=None, scale=3)
                    open_story = gr.Button("Open", scale=1)
                    upload_story = gr.UploadButton("Upload a story (.json / .txt)", file_types=[".json", ".txt"],
                                                   type="filepath", scale=2)
                name = gr.Textbox(label="Title", value="My story", elem_id="sm-title")
                overview = gr.Textbox(label="Overview", value="", lines=2, elem_id="sm-overview")
                table = gr.Dataframe(value=[[1, "cut", "", "", ""]], headers=COLUMNS, label="Shots: one row per "
                                     "shot; cut = a new shot, continue = it continues the previous one",
                                     datatype=["number", "str", "str", "str", "str"], type="array",
                                     column_count=(len(COLUMNS), "fixed"), static_columns=[4], interactive=True,
                                     wrap=True, column_widths=["8%", "12%", "42%", "26%", "12%"],
                                     elem_id="sm-table")
                with gr.Row():
                    add_shot = gr.Button("Add shot", elem_id="sm-add-shot")
                    drop_shot = gr.Button("Remove last shot")
                    check = gr.Button("Check story", elem_id="sm-check")
                issues = gr.HTML(issues_html([]), elem_id="sm-issues-box")
                with gr.Row():
                    save_name = gr.Textbox(label="Save as (stories/NAME.json)", value="my-story", scale=3)
                    save = gr.Button("Save story", scale=1)
                with gr.Accordion("Paste a story (ST-Bench JSON, a JSON list of prompts, or one prompt a line)",
                                  open=False):
                    pasted = gr.Textbox(lines=6, label="Story text")
                    load_pasted = gr.Button("Load into the table")
            with gr.Tab("Render", id="render"):
                with gr.Row():
                    render = gr.Button("Render / resume", variant="primary", elem_id="sm-render")
                    stop = gr.Button("Stop", variant="stop", elem_id="sm-stop")
                    seed = gr.Number(label="Seed", value=template.seed, precision=0)
                progress = gr.HTML(progress_html({"state": "idle"}), elem_id="sm-progress-box")
                shots = gr.HTML(shots_html(root, {"manifest": None}), elem_id="sm-shots-box")
                with gr.Accordion("Resume from a terminal", open=False):
                    cli = gr.Code(value="", language="shell", interactive=False, label="storymem render ...")
            with gr.Tab("Memory", id="memory"):
                memory_shot = gr.Radio(label="Re-render from shot (its memory: the bank saved after the shot before)",
                                       choices=[], elem_id="sm-memory-shot")
                bank = gr.HTML("", elem_id="sm-bank-box")
                remove = gr.CheckboxGroup(label="Remove from the memory", choices=[], elem_id="sm-remove")
                pin = gr.CheckboxGroup(label="Pin (keep it always: it becomes a reference image)", choices=[],
                                       elem_id="sm-pin")
                references = gr.File(label="Add reference images", file_count="multiple", file_types=["image"],
                                     type="filepath", elem_id="sm-refs")
                with gr.Row():
                    save_edit = gr.Button("Save memory edit", elem_id="sm-save-edit")
                    rerender = gr.Button("Re-render from this shot", variant="primary", elem_id="sm-rerender")
                edits = gr.HTML(edits_html([]), elem_id="sm-edits-box")
            with gr.Tab("Takes", id="takes"):
                take_shot = gr.Radio(label="Shot", choices=[], elem_id="sm-take-shot")
                takes_view = gr.HTML("", elem_id="sm-takes-box")
                take = gr.Radio(label="Take the story continues from", choices=[], elem_id="sm-take")
                with gr.Row():
                    use_take = gr.Button("Use this take", variant="primary", elem_id="sm-use-take")
                    rerender_take = gr.Button("Re-render from this shot", elem_id="sm-take-rerender")

        # ------------------------------------------------------------------ story
        def on_check(name_, overview_, rows):
            story, found = studio.check(draft_of(name_, overview_, rows))
            return issues_column(rows or [], found), issues_html(found, story)

        check.click(on_check, [name, overview, table], [table, issues])

        def on_add(rows):
            rows = [list(r) for r in (rows or [])]
            scene = rows[-1][0] if rows and str(rows[-1][0]).strip() else 1
            return rows + [[scene, "cut", "", "", ""]]

        add_shot.click(on_add, table, table)
        drop_shot.click(lambda rows: [list(r) for r in (rows or [])][:-1] or [[1, "cut", "", "", ""]], table, table)

        def loaded(draft, note: str):
            return (draft.name, draft.overview, issues_column(draft.rows, []), issues_html([]), say(note),
                    slug(draft.name))

        story_outputs = [name, overview, table, issues, message, save_name]

        def on_open_story(file_name):
            try:
                return loaded(studio.open_story(file_name or ""), f"opened stories/{file_name}")
            except StudioError as err:
                return (gr.skip(),) * 4 + (say(str(err), True), gr.skip())

        open_story.click(on_open_story, stories, story_outputs)

        def on_upload(path):
            try:
                draft, saved = studio.upload_story(path)
            except StudioError as err:
                return (gr.skip(),) * 4 + (say(str(err), True), gr.skip(), gr.skip())
            return loaded(draft, f"uploaded and kept as stories/{saved}") + (
                gr.update(choices=studio.workspace.stories(), value=saved),)

        upload_story.upload(on_upload, upload_story, story_outputs + [stories])

        def on_paste(text):
            try:
                return loaded(studio.import_text(text), "loaded the pasted story")
            except StudioError as err:
                return (gr.skip(),) * 4 + (say(str(err), True), gr.skip())

        load_pasted.click(on_paste, pasted, story_outputs)

        def on_save(file_name, name_, overview_, rows):
            try:
                saved, found = studio.save_story(file_name, draft_of(name_, overview_, rows))
            except StudioError as err:
                return gr.skip(), gr.skip(), say(str(err), True), gr.skip()
            if saved is None:
                return issues_column(rows, found), issues_html(found), say("not saved: the story has issues", True), \
                    gr.skip()
            return gr.skip(), gr.skip(), say(f"saved stories/{saved}"), gr.update(choices=studio.workspace.stories(),
                                                                                value=saved)

        save.click(on_save, [save_name, name, overview, table], [table, issues, message, stories])

        # ------------------------------------------------------------------ runs
        def run_views(run_name, status=None):
            """(shots html, memory radio, takes radio, edits html, cli) of a run."""
            try:
                state = studio.run_state(run_name)
            except StudioError:
                return shots_html(root, {"manifest": None}), gr.update(choices=[]), gr.update(choices=[]), \
                    edits_html([]), ""
            memory_choices, take_choices = shot_choices(state)
            return (shots_html(root, state, status), gr.update(choices=memory_choices),
                    gr.update(choices=take_choices), edits_html(state["edits"]), studio.cli_command(run_name))

        def on_open_run(run_name):
            if not run_name:
                return (gr.skip(),) * 11
            try:
                draft = studio.open_run(run_name)
            except StudioError as err:
                return (gr.skip(),) * 4 + (say(str(err), True),) + (gr.skip(),) * 6
            page, memory_update, takes_update, edits_page, command = run_views(run_name, studio.progress())
            memory_update["value"], takes_update["value"] = None, None
            return (*loaded(draft, "")[:4], say(f"opened run {run_name}"), run_name, page, memory_update,
                    takes_update, edits_page, command)

        runs.change(on_open_run, runs, [name, overview, table, issues, message, run, shots, memory_shot, take_shot,
                                        edits, cli])
        refresh_runs.click(lambda: gr.update(choices=studio.workspace.runs()), None, runs)

        # ------------------------------------------------------------------ render
        def on_render(run_name, name_, overview_, rows, seed_):
            draft = draft_of(name_, overview_, rows)
            story, found = studio.check(draft)
            if story is None:
                return issues_column(rows or [], found), issues_html(found), say(
                    "fix the story first (see the check column)", True), gr.skip()
            try:
                note = studio.start_render(run_name, draft, seed=_int(seed_))
            except StudioError as err:
                return gr.skip(), issues_html([], story), say(str(err), True), gr.skip()
            return gr.skip(), issues_html([], story), say(note), gr.update(choices=studio.workspace.runs())

        render.click(on_render, [run, name, overview, table, seed], [table, issues, message, runs])
        stop.click(lambda: say(studio.stop()), None, message)

        def on_tick(run_name, shown, version):
            status = studio.progress()
            html = progress_html(status)
            try:
                state = studio.run_state(run_name)
            except StudioError:
                return html, gr.skip(), shown, gr.skip(), gr.skip(), gr.skip(), gr.skip(), version
            page = shots_html(root, state, status)
            manifest = state.get("manifest") or {}
            now = f"{manifest.get('updated')}|{len(manifest.get('shots', []))}|{len(state['edits'])}"
            if now == version:
                return html, (gr.skip() if page == shown else page), page, gr.skip(), gr.skip(), gr.skip(), \
                    gr.skip(), version
            memory_choices, take_choices = shot_choices(state)
            return (html, page, page, gr.update(choices=memory_choices), gr.update(choices=take_choices),
                    edits_html(state["edits"]), studio.cli_command(run_name), now)

        timer = gr.Timer(1.0)
        timer.tick(on_tick, [run, last_shots, last_version],
                   [progress, shots, last_shots, memory_shot, take_shot, edits, cli, last_version],
                   show_progress="hidden")

        # ------------------------------------------------------------------ memory
        def on_memory_shot(run_name, shot):
            if not shot:
                return "", gr.update(choices=[], value=[]), gr.update(choices=[], value=[])
            try:
                items = studio.memory(run_name, int(shot))
            except StudioError as err:
                return say(str(err), True), gr.update(choices=[], value=[]), gr.update(choices=[], value=[])
            choices = [(item.label, item.key) for item in items]
            return (bank_html(items, int(shot)), gr.update(choices=choices, value=[]),
                    gr.update(choices=[c for c, i in zip(choices, items) if i.kind == "keyframe"], value=[]))

        memory_shot.change(on_memory_shot, [run, memory_shot], [bank, remove, pin], show_progress="hidden")

        def on_save_edit(run_name, shot, remove_, pin_, files):
            if not shot:
                return say("choose the shot to re-render first", True), gr.skip(), gr.skip(), gr.skip(), \
                    gr.skip(), gr.skip()
            try:
                record = studio.edit_memory(run_name, int(shot), remove_ or [], pin_ or [], files or [])
            except StudioError as err:
                return say(str(err), True), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            html, remove_update, pin_update = on_memory_shot(run_name, shot)
            state = studio.run_state(run_name)
            return (say(f"memory edit #{record['id']} saved: shot {int(shot)} on will be drawn from it when you "
                        "re-render"), html, remove_update, pin_update, None, edits_html(state["edits"]))

        save_edit.click(on_save_edit, [run, memory_shot, remove, pin, references],
                        [message, bank, remove, pin, references, edits])

        def start_from(run_name, shot, seed_):
            if not shot:
                return say("choose a shot first", True)
            try:
                draft = studio.open_run(run_name)
                return say(studio.start_render(run_name, draft, seed=_int(seed_), from_shot=int(shot)))
            except StudioError as err:
                return say(str(err), True)

        rerender.click(start_from, [run, memory_shot, seed], message)

        # ------------------------------------------------------------------ takes
        def on_take_shot(run_name, stem):
            if not stem:
                return "", gr.update(choices=[], value=None)
            try:
                index = studio.takes(run_name, stem)
            except (StudioError, ValueError) as err:
                return say(str(err), True), gr.update(choices=[], value=None)
            choices = [(f"take {t['take']}" + (" (current)" if t["take"] == index.get("current") else ""), t["take"])
                       for t in index.get("takes", [])]
            edits_list = studio.run_state(run_name)["edits"]
            return (takes_html(root, studio.folder(run_name), stem, index, edits_list),
                    gr.update(choices=choices, value=index.get("current")))

        take_shot.change(on_take_shot, [run, take_shot], [takes_view, take], show_progress="hidden")

        def on_use_take(run_name, stem, take_):
            if not stem or not take_:
                return say("choose a shot and a take", True), gr.skip(), gr.skip()
            try:
                note = studio.pick_take(run_name, stem, int(take_))
            except StudioError as err:
                return say(str(err), True), gr.skip(), gr.skip()
            html, choices = on_take_shot(run_name, stem)
            return say(note), html, choices

        use_take.click(on_use_take, [run, take_shot, take], [message, takes_view, take])

        def on_rerender_take(run_name, stem, seed_):
            state = studio.run_state(run_name) if stem else {}
            stems = [e["stem"] for e in (state.get("manifest") or {}).get("shots", [])]
            if stem not in stems:
                return say("choose a rendered shot", True)
            return start_from(run_name, stems.index(stem) + 1, seed_)

        rerender_take.click(on_rerender_take, [run, take_shot, seed], message)
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
    # Uploads land inside the workspace, and the page never phones home.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    try:
        workspace_root = Path(options.workspace).expanduser()
        workspace_root.mkdir(parents=True, exist_ok=True)
        upload_dir = workspace_root.resolve() / ".studio" / "uploads"
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
