# Sources of the caftrain library, listed explicitly, layer by layer (see docs/design.md).
set(CAFTRAIN_SOURCES
  # core: errors and plain value types
  core/config.cpp
  core/error.cpp
  core/metrics_json.cpp
  core/process_role.cpp
  core/subprocess.cpp
  # data: IDX readers, datasets, samplers, loaders
  data/dataset.cpp
  data/fashion_mnist.cpp
  data/idx.cpp
  data/loader.cpp
  data/sampler.cpp
  # models: reference models of the seed
  models/resnet.cpp
  # checkpoint: state dicts, durable files, checkpoint directories
  checkpoint/checkpoint.cpp
  checkpoint/checkpoint_manager.cpp
  checkpoint/files.cpp
  checkpoint/optimizer_archive.cpp
  checkpoint/sharded.cpp
  checkpoint/state_dict.cpp
  # environment: where a worker stands, communicators
  environment/actor_environment.cpp
  environment/actor_store.cpp
  environment/cluster_environment.cpp
  environment/communicator.cpp
  environment/gloo_communicator.cpp
  environment/local_communicator.cpp
  environment/store.cpp
  environment/worker_context.cpp
  # strategies
  strategies/block_cache.cpp
  strategies/ddp_strategy.cpp
  strategies/flat_shard.cpp
  strategies/fsdp_strategy.cpp
  strategies/gradient_reducer.cpp
  strategies/sharded_strategy.cpp
  strategies/zero_strategy.cpp
  strategies/registry.cpp
  strategies/strategy.cpp
  # callbacks and loggers
  callbacks/callback.cpp
  callbacks/csv_logger.cpp
  callbacks/early_stopping.cpp
  callbacks/lr_monitor.cpp
  callbacks/model_checkpoint.cpp
  callbacks/progress_bar.cpp
  callbacks/report_callback.cpp
  callbacks/tune_report_callback.cpp
  # train: the Lightning-style loop
  train/lightning_module.cpp
  train/lr_scheduler.cpp
  train/metrics_collector.cpp
  train/precision.cpp
  train/prepare_trainer.cpp
  train/session.cpp
  train/trainer.cpp
  train/trainer_state.cpp
  # actors: the trainer, its workers, messages, and the TorchTrainer façade
  actors/checkpoint_transfer.cpp
  actors/cluster.cpp
  actors/head.cpp
  actors/messages.cpp
  actors/network.cpp
  actors/node_agent.cpp
  actors/pool_actor.cpp
  actors/process_launcher.cpp
  actors/resource_pool.cpp
  actors/result.cpp
  actors/run_files.cpp
  actors/store_server.cpp
  actors/torch_trainer.cpp
  actors/trainer_actor.cpp
  actors/worker.cpp
  actors/worker_process.cpp
  # tune: search spaces, searchers and trial schedulers (no torch, no CAF)
  tune/async_hyperband_scheduler.cpp
  tune/basic_variant_generator.cpp
  tune/concurrency_limiter.cpp
  tune/domain.cpp
  tune/fifo_scheduler.cpp
  tune/hyperband_scheduler.cpp
  tune/median_stopping_rule.cpp
  tune/mode.cpp
  tune/param_space.cpp
  tune/parzen_estimator.cpp
  tune/population_based_training.cpp
  tune/rng.cpp
  tune/searcher.cpp
  tune/tpe_search.cpp
  tune/trial_scheduler.cpp
  # tune: the Tuner, its actor, its results and its trial table
  tune/progress_reporter.cpp
  tune/result_grid.cpp
  tune/tensorboard.cpp
  tune/tuner.cpp
  tune/tuner_actor.cpp
)
