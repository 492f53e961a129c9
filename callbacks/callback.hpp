// Callback: the hooks a Trainer calls during fit, validate and test.
#pragma once

#include <cstdint>
#include <exception>
#include <string>

#include <ATen/core/Tensor.h>
#include <nlohmann/json_fwd.hpp>
#include <torch/data/example.h>

namespace caftrain {

class Trainer;
class LightningModule;
using Batch = torch::data::Example<>;

/// What the Trainer is doing when a hook runs.
enum class Stage { fit, validate, test, sanity_check };

/// Lightning's `Callback`: every hook is a no-op unless overridden. A callback with state
/// (best score, patience counter, ...) returns it from `state_dict` so that it is saved in
/// checkpoints and restored by `load_state_dict` when training resumes.
///
/// Hooks run on every rank; a callback that writes files or prints checks
/// `trainer.is_global_zero()` itself.
class Callback {
 public:
  virtual ~Callback();

  // -- identity ---------------------------------------------------------------------

  /// Key under which this callback's state is stored in a checkpoint. Defaults to the
  /// class name; override when two instances of one class need separate state.
  virtual std::string state_key() const;

  // -- fit / validate / test ----------------------------------------------------------

  virtual void setup(Trainer& trainer, LightningModule& module, Stage stage) {}
  virtual void teardown(Trainer& trainer, LightningModule& module, Stage stage) {}
  virtual void on_fit_start(Trainer& trainer, LightningModule& module) {}
  virtual void on_fit_end(Trainer& trainer, LightningModule& module) {}

  // -- training ---------------------------------------------------------------------

  virtual void on_train_start(Trainer& trainer, LightningModule& module) {}
  virtual void on_train_end(Trainer& trainer, LightningModule& module) {}
  virtual void on_train_epoch_start(Trainer& trainer, LightningModule& module) {}
  virtual void on_train_epoch_end(Trainer& trainer, LightningModule& module) {}
  virtual void on_train_batch_start(Trainer& trainer, LightningModule& module,
                                    const Batch& batch, int64_t batch_idx) {}
  /// `loss` is the (unscaled) loss training_step returned for this batch.
  virtual void on_train_batch_end(Trainer& trainer, LightningModule& module,
                                  const at::Tensor& loss, const Batch& batch, int64_t batch_idx) {}
  virtual void on_before_optimizer_step(Trainer& trainer, LightningModule& module) {}

  // -- validation and test ------------------------------------------------------------

  virtual void on_validation_start(Trainer& trainer, LightningModule& module) {}
  virtual void on_validation_end(Trainer& trainer, LightningModule& module) {}
  virtual void on_validation_epoch_start(Trainer& trainer, LightningModule& module) {}
  virtual void on_validation_epoch_end(Trainer& trainer, LightningModule& module) {}
  virtual void on_validation_batch_end(Trainer& trainer, LightningModule& module,
                                       const Batch& batch, int64_t batch_idx) {}
  virtual void on_test_start(Trainer& trainer, LightningModule& module) {}
  virtual void on_test_end(Trainer& trainer, LightningModule& module) {}
  virtual void on_test_epoch_end(Trainer& trainer, LightningModule& module) {}
  virtual void on_test_batch_end(Trainer& trainer, LightningModule& module, const Batch& batch,
                                 int64_t batch_idx) {}

  // -- checkpoints and failures -------------------------------------------------------

  /// Called while a checkpoint is assembled; `checkpoint` is its JSON trainer state and
  /// may receive extra entries.
  virtual void on_save_checkpoint(Trainer& trainer, LightningModule& module,
                                  nlohmann::json& checkpoint) {}
  virtual void on_load_checkpoint(Trainer& trainer, LightningModule& module,
                                  const nlohmann::json& checkpoint) {}
  /// Called when fit/validate/test ends with an exception, before it propagates.
  virtual void on_exception(Trainer& trainer, LightningModule& module,
                            const std::exception& error) {}

  // -- state ------------------------------------------------------------------------

  /// The callback's state, saved in checkpoints. Default: empty (null JSON).
  virtual nlohmann::json state_dict() const;
  virtual void load_state_dict(const nlohmann::json& state);
};

} // namespace caftrain
