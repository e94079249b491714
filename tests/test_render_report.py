"""Contact sheet and index.html of a render folder."""

import numpy as np
from PIL import Image

from storymem.render.report import (
    KEYFRAME_COLOUR,
    MEMORY_COLOUR,
    SheetRow,
    build_contact_sheet,
    write_index_html,
    write_report,
)


def _frame(value, size=(32, 48)):
    return np.full((*size, 3), value, dtype=np.uint8)


def test_contact_sheet_rows_and_groups():
    rows = [
        SheetRow("01_01  M2V", memory=[], samples=[_frame(10), _frame(20)], keyframes=[_frame(30)]),
        SheetRow("01_02  MI2V", memory=[_frame(30)], samples=[_frame(40)] * 3, keyframes=[]),
    ]
    sheet = build_contact_sheet(rows, thumb_height=48, title="story")
    pixels = np.asarray(sheet)
    assert sheet.height > 2 * 48
    colours = {tuple(c) for c in pixels.reshape(-1, 3)}
    assert MEMORY_COLOUR in colours and KEYFRAME_COLOUR in colours
    assert (40, 40, 40) in colours and (10, 10, 10) in colours  # the sample frames are pasted
    # The second row holds one memory thumb framed in blue; the first row none.
    row_height = (sheet.height - 28) // 2
    first, second = pixels[28:28 + row_height], pixels[28 + row_height:]
    assert (first == MEMORY_COLOUR).all(axis=-1).sum() == 0
    assert (second == MEMORY_COLOUR).all(axis=-1).sum() > 0


def test_index_html_escapes_and_links(tmp_path):
    Image.fromarray(_frame(50)).save(tmp_path / "k.png")
    manifest = {
        "story": {"story_name": "A <b>story</b>", "story_overview": "x & y"},
        "num_shots": 2, "finished": False, "settings": {"steps": 8},
        "outputs": {"story_video": "story.mp4", "contact_sheet": "contact_sheet.png"},
        "shots": [{"stem": "01_01", "file": "shots/01_01.mp4", "mode": "m2v", "seed": 0, "prompt": "a <red> circle",
                   "memory": [{"kind": "keyframe", "shot_stem": "00_01", "frame": 3, "file": "k.png"}],
                   "keyframes": [{"frame": 1, "file": "k.png"}], "samples": ["k.png"]}],
    }
    page = write_index_html(tmp_path / "index.html", manifest).read_text()
    assert "A &lt;b&gt;story&lt;/b&gt;" in page and "a &lt;red&gt; circle" in page
    assert '<video src="shots/01_01.mp4"' in page and "1 of 2 shots rendered" in page
    assert 'class="mem" src="k.png"' in page and 'class="key" src="k.png"' in page
    sheet, _ = write_report(tmp_path, manifest)
    with Image.open(sheet) as im:
        assert im.format == "PNG"
