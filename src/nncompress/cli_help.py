"""Help texts of the ``nncompress`` command line (:mod:`nncompress.cli_parser`), kept
apart from the parser so that both stay short. Nothing here imports torch: ``--help``
stays fast."""

from __future__ import annotations

__all__ = ["CLASS_HELP", "COMPRESS_TEXT", "DATA_HELP", "EVAL_TEACHER_HELP", "METRICS_HELP",
           "METRIC_DEFAULT", "METRIC_HELP", "MODEL_REF_HELP", "MULTI_MODEL_HELP",
           "TEACHER_HELP"]

DATA_HELP = ("dataset: mnist1d, digits or package.module:function returning labelled data or "
             "inputs only (found in this folder too)")
MODEL_REF_HELP = ("a .nnc file, or package.module:function: a function taking no arguments "
                  "that returns an nn.Module (found in this folder too)")
MULTI_MODEL_HELP = ("a reference model name (trained here on its task), a .nnc file, or "
                    "package.module:function returning an nn.Module")
CLASS_HELP = ("package.module:Class of the user model a .nnc file holds; Class() builds "
              "the skeleton its tensors load into")
#: quality metric -> what it compares: the names of nncompress.measure.METRICS, kept here so
#: that --help does not import torch (a test checks that the two agree)
METRICS_HELP = {"accuracy": "needs labels", "agreement": "top-1 with the teacher",
                "cosine": "of the outputs to the teacher's", "kl": "to the teacher, nats",
                "mse": "to float targets, else to the teacher's outputs",
                "r2": "as mse"}
METRIC_HELP = ("quality metric measured and named in every table: "
               + ", ".join(f"{k} ({v})" for k, v in METRICS_HELP.items()))
METRIC_DEFAULT = "accuracy, or agreement (with the teacher's top-1) for data with inputs only"
TEACHER_HELP = ("what every stage that trains learns from: original (distillation from the "
                "uncompressed input model with the recipe's distill settings; by default KD "
                "at T=4, alpha=0.9, or the cosine / MSE of the outputs to the teacher's when "
                "--metric is cosine / mse / r2) or none (cross-entropy on the labels); "
                "default: the recipe's distill key, and original for --data with inputs only")
EVAL_TEACHER_HELP = ("the model teacher metrics compare with, e.g. the uncompressed one "
                     "(needed for data with inputs only): " + MODEL_REF_HELP)
COMPRESS_TEXT = """\
Compress a model with a recipe, measure it before and after every stage, save the .nnc.

Label-free compression: --data may give inputs only (a package.module:function returning
(x_train, x_test) arrays, or two DataLoaders whose batches are the inputs x alone). Every
stage that trains then distils from the uncompressed input model (--teacher original is
implied), post-training stages (calibration, least-squares reconstruction, sensitivity)
read inputs only, and the tables show the top-1 agreement with the uncompressed model
(training uses KD on its soft outputs) unless --metric names another label-free metric
(cosine for an embedding model: training then maximises it; kl; mse or r2). --metric
accuracy needs labels; --max-drop is then a budget in points of the metric (agreement,
cosine or r2) against the uncompressed model on held-out training inputs. On labelled
data, --teacher original makes every training stage distil from the uncompressed model
(Hinton, Vinyals & Dean 2015 KD; the recipe's distill key sets T, alpha and the loss)
instead of learning from the labels alone."""
