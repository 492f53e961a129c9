// Saving and restoring a running fit (Lightning's checkpoint connector).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "checkpoint/checkpoint.hpp"

namespace caftrain {

class Trainer;

/// Files this rank contributes to a checkpoint of the running fit (collective: every
/// rank calls it at the same point). On a non-sharded strategy rank 0 returns the whole
/// checkpoint and the others nothing; on a sharded one every rank returns its shards.
/// A snapshot: the model's and optimizers' tensors are copied now (into the trainer's
/// reused buffers) and serialized when the files are written, on any thread, while
/// training goes on.
///
/// - `model.pt`: the module's state dict (Python's torch.load reads it)
/// - `optimizer.pt`: every optimizer's state (libtorch archive)
/// - `trainer_state.json`: epoch, step, batch to resume at, schedulers, callbacks, hparams
/// - `rng.pt`: libtorch's global generator state
CheckpointFiles checkpoint_files(Trainer& trainer);

/// Writes a checkpoint of the running fit into directory `path` (collective; committed
/// atomically by rank 0 once every rank's files are in place).
void write_checkpoint(Trainer& trainer, const std::string& path);

/// Restores model, optimizers, schedulers, callbacks and progress from the checkpoint
/// directory `path` (validated by checksum first). Called by `fit(..., ckpt_path)` after
/// the strategy and optimizers are set up.
void restore_checkpoint(Trainer& trainer, const std::string& path);

} // namespace caftrain
