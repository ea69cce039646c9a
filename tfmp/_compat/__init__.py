"""Every use tfmp makes of Keras', TensorFlow's and LiteRT's private APIs, behind one fence.

Nothing else in tfmp touches a `keras.src` module, an underscore attribute of a
Keras or TensorFlow object, or a method Keras calls on itself. Each function here
names the internal it relies on, the Keras version it was checked against
(`CHECKED_WITH`) and, where it works around a Keras bug, the upstream issue;
`tests/test_compat.py` exercises each one on the installed Keras and fails naming
the version when the internal is gone or behaves otherwise. An internal that has
disappeared raises `KerasInternalsChanged` (never an AttributeError from deep
inside a train step, never a silent fallback).

Modules: `base` (the version, the upstream issues, `KerasInternalsChanged`), `layers`
(Keras' layers and models, any backend), `optimizers` (`BaseOptimizer.apply()`'s pieces),
`trainers` (train steps, metrics, callbacks), `tensorflow` (Keras' TensorFlow backend,
TensorFlow, LiteRT). Callers use the names exported here.
"""

from tfmp._compat.base import (CHECKED_WITH, ISSUE_ACCUMULATION_UNDER_STRATEGY,
                               ISSUE_MULTI_WORKER_FIT, KerasInternalsChanged)
from tfmp._compat.layers import (AttentionWithOwnSoftmax, calls_wrapped, clear_losses,
                                 flatten_layers, functional_class, inbound_tensors,
                                 remove_instance_call, set_instance_call,
                                 no_automatic_dependency_tracking, outputs_structure,
                                 own_non_trainable_variables, own_variables, producer,
                                 recast_variable)
from tfmp._compat.optimizers import (applies_own_weight_decay, apply_decided, build_after_scale_state, build_scale_state,
                                     built_variables, ema_overwrite_due,
                                     finish_apply, micro_batches, overwrite_with_ema,
                                     overwrites_with_gradient, reading_dtype,
                                     learning_rate_schedule, uses_weight_decay,
                                     variable_index, ViewedUpdates)
from tfmp._compat.tensorflow import (current_graph, export_input_signature, first_batch,
                                     in_multi_worker_mode, interpreter_ops,
                                     keras_reduces_scalar_logs_along_axis_0,
                                     supports_no_merge_call, symbolic_build, wrap_symbolic_build)
from tfmp._compat.trainers import (BACKUP_SAVE_HOOK, BackupFiles, BackupWithOwnSave, attach_metric,
                                   backup_files, compile_arguments, forget_compilation,
                                   backup_progress, forget_traced_functions,
                                   forget_train_function, model_metrics,
                                   restore_traced_functions, resume_after_epoch,
                                   suspend_saving, traced_functions, wrap_step)
