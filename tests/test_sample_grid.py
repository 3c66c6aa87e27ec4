import lightning as L
import pytest
import torch
from conftest import randomise_unet, tiny_datamodule
from PIL import Image
from test_ldm import make_ldm

from lit_diffusion.callbacks.sample_grid import SampleGrid


def test_grid_rows_columns_and_negative_prompt_row(tiny_ckpts):
    model = make_ldm(tiny_ckpts)
    randomise_unet(model)
    grid = SampleGrid(prompts=["a large red circle", "a small blue square"], guidance=[1.0, 4.0],
                      negative_prompt="a green triangle", steps=3)
    rows, labels = grid.grid(model)
    assert len(rows) == 3 and all(r.shape == (2, 3, 16, 16) for r in rows)
    assert labels[-1] == "a small blue square\n(negative: a green triangle)"
    plain, negative = rows[1], rows[2]
    torch.testing.assert_close(negative[0], plain[0])  # guidance 1: the negative prompt plays no part
    assert (negative[1] - plain[1]).abs().max() > 1e-4  # guidance 4: it replaces the unconditional branch
    # fixed seeds: the same grid twice
    again, _ = grid.grid(model)
    assert all(torch.equal(a, b) for a, b in zip(rows, again))


@pytest.mark.parametrize("accumulate", [1, 2])
def test_callback_writes_a_grid_every_n_steps_and_at_the_end(tiny_ckpts, tmp_path, accumulate):
    """With gradient accumulation the micro-batches of a step end at one global_step: the first ones end at step 0,
    where a cadence read from global_step alone drew the untrained model."""
    model = make_ldm(tiny_ckpts)
    grid = SampleGrid(prompts=["a large red circle"], guidance=[1.0, 3.0], every_n_steps=2, steps=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        accumulate_grad_batches=accumulate, callbacks=[grid], default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=tiny_datamodule(tiny_ckpts["data"]))
    names = sorted(p.name for p in (tmp_path / "media").glob("samples_step*.png"))
    assert names == ["samples_step0000002.png", "samples_step0000003.png"]
    assert Image.open(tmp_path / "media" / names[-1]).size[0] > 2 * 16


@pytest.mark.parametrize("n_rows,n_cols", [(1, 1), (1, 4), (2, 3), (5, 8)])
def test_grid_texts_never_overlap(n_rows, n_cols):
    """The title, the column titles and the row labels of a grid, as drawn: no two text boxes intersect (one prompt
    and four seeds used to put the sampler's title over the seed labels)."""
    import matplotlib.pyplot as plt

    from lit_diffusion.evaluation.plots import grid_figure

    rows = [torch.rand(n_cols, 3, 16, 16) for _ in range(n_rows)]
    labels = [f"a small blue square above a large red circle, row {i}\n(negative: a purple square)"
              for i in range(n_rows)]
    fig = grid_figure(rows, labels, col_titles=[f"seed {j}" for j in range(n_cols)],
                      title="heun, 13 steps, guidance 3, 32x32 px")
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = [t for t in fig.findobj(plt.Text) if t.get_text() and t.get_visible()]
    assert len(texts) == 1 + n_cols + n_rows
    boxes = [t.get_window_extent(renderer) for t in texts]
    for a in range(len(boxes)):
        for b in range(a + 1, len(boxes)):
            assert not boxes[a].overlaps(boxes[b]), (texts[a].get_text(), texts[b].get_text())
    plt.close(fig)
