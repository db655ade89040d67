"""``vit.loop_state`` reads attributes Lightning does not promise to keep: these fail when a release moves them."""

import lightning as L

from vit import loop_state, run
from vit.data import FakeDataModule


class Record(L.Callback):
    def __init__(self):
        self.trained, self.mid_epoch = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.trained.append((batch_idx, loop_state.batches_trained(trainer)))
        self.mid_epoch.append(loop_state.in_mid_epoch(trainer))

    def on_train_end(self, trainer, pl_module):
        self.mid_epoch.append(loop_state.in_mid_epoch(trainer))


def test_the_loop_counts_are_where_vit_reads_them(make_cfg, monkeypatch):
    before = []
    prepare = FakeDataModule.on_after_batch_transfer

    def recording(self, batch, dataloader_idx):
        if self.trainer.training:
            before.append(loop_state.batches_before_this_one(self.trainer))
        return prepare(self, batch, dataloader_idx)

    monkeypatch.setattr(FakeDataModule, "on_after_batch_transfer", recording)
    record = Record()
    cfg = make_cfg(["trainer.max_epochs=2", "test=false"])
    datamodule, _, module = run.build_for_fit(cfg)
    trainer = run.build_trainer(cfg, [record], limit_val_batches=0, enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    batches = (256 - 64) // 32
    assert before == [*range(batches)] * 2  # each batch's index in its epoch
    assert record.trained == [(i, i + 1) for i in range(batches)] * 2
    assert record.mid_epoch == [True] * 2 * batches + [False]
