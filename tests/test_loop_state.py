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


class RecordValidation(L.Callback):
    def __init__(self):
        self.seen, self.rewound = [], None

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.seen.append(("batch", loop_state.in_mid_validation(trainer)))
        if self.rewound is None and not trainer.sanity_checking:
            checkpoint = trainer._checkpoint_connector.dump_checkpoint()
            loop_state.validate_again(checkpoint)
            self.rewound = checkpoint["loops"]["fit_loop"]["epoch_loop.val_loop.batch_progress"]["total"]

    def on_validation_end(self, trainer, pl_module):
        self.seen.append(("end", loop_state.in_mid_validation(trainer)))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(("train", loop_state.in_mid_validation(trainer)))


def test_a_validation_in_progress_is_where_vit_reads_it(make_cfg):
    """In a fit's validation until its last batch is done (not in the sanity check), and the checkpoint key it rewinds."""
    record = RecordValidation()
    cfg = make_cfg(["trainer.max_epochs=1", "test=false", "data.eval_batch_size=32", "trainer.num_sanity_val_steps=1"])
    datamodule, _, module = run.build_for_fit(cfg)
    trainer = run.build_trainer(cfg, [record], enable_checkpointing=False)
    trainer.fit(module, datamodule=datamodule)
    batches = (256 - 64) // 32
    assert record.seen == [("batch", False), ("end", False), *[("train", False)] * batches, ("batch", True), ("batch", True), ("end", False)]
    assert record.rewound == {"ready": 1, "started": 1, "processed": 0, "completed": 0}
