# flexmix's side of benchmarks/glm_flexmix.py: a K-component mixture of Poisson regressions
# y ~ x (log link, intercept + x) fitted by flexmix's EM from given hard assignments.
#
# Usage: Rscript glm_flexmix.R DATA.csv OUT.json [K=3] [FIXED_ITER=20] [TOL=1e-10]
#                              [MAX_ITER=2000] [REPEATS=3]
#
# DATA.csv has columns x, y and start (the initial cluster of each row, 1..K). Written to OUT.json:
# - "fit": one fit to convergence (control: iter.max = MAX_ITER, tolerance = TOL, minprior = 0, so
#   no component is dropped): wall time, fit@iter, logLik(fit), parameters(fit), prior(fit);
# - "fixed": REPEATS fits of exactly FIXED_ITER iterations (tolerance = 0: flexmix stops when
#   |llh - llh_old| / (|llh| + 0.1) < tolerance, never true with 0 unless llh repeats exactly) and
#   of exactly 1 iteration, timed alternately; per iteration: the FIXED_ITER fit over FIXED_ITER,
#   and the marginal (t(FIXED_ITER) - t(1)) / (FIXED_ITER - 1), which leaves out the set-up
#   (model frame, design matrix) that a fit pays once.
# flexmix's iteration: the M-step (one glm.fit per component, IRLS to glm.control()'s convergence,
# started from the component's previous coefficients), then the E-step and the log-likelihood.
# Times are elapsed seconds (proc.time), after one untimed warm-up fit.

suppressPackageStartupMessages({
  library(flexmix)
  library(jsonlite)
})

args <- commandArgs(trailingOnly = TRUE)
if (length(args) < 2) stop("usage: Rscript glm_flexmix.R DATA.csv OUT.json [K] [FIXED_ITER] [TOL] [MAX_ITER] [REPEATS]")
arg <- function(i, default) if (length(args) >= i) as.numeric(args[[i]]) else default
data_path <- args[[1]]
out_path <- args[[2]]
K <- as.integer(arg(3, 3))
fixed_iter <- as.integer(arg(4, 20))
tol <- arg(5, 1e-10)
max_iter <- as.integer(arg(6, 2000))
repeats <- as.integer(arg(7, 3))

d <- read.csv(data_path, colClasses = c("numeric", "numeric", "integer"))
start <- d$start

fit_once <- function(iter_max, tolerance) {
  t0 <- proc.time()[["elapsed"]]
  fit <- flexmix(y ~ x, data = d, k = K, cluster = start,
                 model = FLXMRglm(family = "poisson"),
                 control = list(iter.max = iter_max, tolerance = tolerance, minprior = 0))
  list(fit = fit, seconds = proc.time()[["elapsed"]] - t0)
}

describe <- function(fit) {
  p <- parameters(fit)  # (P, K): rows coef.(Intercept), coef.x
  list(iter = fit@iter, converged = fit@converged, loglik = as.numeric(logLik(fit)),
       k = fit@k, coef = unname(lapply(seq_len(ncol(p)), function(j) unname(p[, j]))),
       coef_names = rownames(p), prior = unname(prior(fit)))
}

invisible(fit_once(2, 0))  # warm-up: loads and byte-compiles what the fits call

full <- fit_once(max_iter, tol)
res_fit <- c(describe(full$fit), list(seconds = full$seconds,
                                      ms_per_iter = 1e3 * full$seconds / full$fit@iter,
                                      tolerance = tol, iter_max = max_iter))

t_fixed <- numeric(0)
t_one <- numeric(0)
fixed_desc <- NULL
for (r in seq_len(repeats)) {
  a <- fit_once(fixed_iter, 0)
  b <- fit_once(1, 0)
  if (a$fit@iter != fixed_iter) stop(sprintf("the fixed fit ran %d iterations, not %d", a$fit@iter, fixed_iter))
  t_fixed <- c(t_fixed, a$seconds)
  t_one <- c(t_one, b$seconds)
  fixed_desc <- describe(a$fit)
}
marginal <- (t_fixed - t_one) / (fixed_iter - 1)
res_fixed <- list(iterations = fixed_iter, repeats = repeats, seconds = t_fixed, seconds_one_iter = t_one,
                  ms_per_iter_median = 1e3 * median(t_fixed) / fixed_iter,
                  ms_per_iter_min = 1e3 * min(t_fixed) / fixed_iter,
                  marginal_ms_per_iter_median = 1e3 * median(marginal),
                  marginal_ms_per_iter_min = 1e3 * min(marginal),
                  loglik = fixed_desc$loglik)

out <- list(n = nrow(d), K = K, fit = res_fit, fixed = res_fixed,
            versions = list(R = R.version.string, flexmix = as.character(packageVersion("flexmix")),
                            jsonlite = as.character(packageVersion("jsonlite"))),
            blas = tryCatch(extSoftVersion()[["BLAS"]], error = function(e) ""),
            method = paste("flexmix(y ~ x, k, cluster = start, model = FLXMRglm(family = 'poisson'),",
                           "control = list(iter.max, tolerance, minprior = 0)); elapsed time (proc.time)"))
tmp <- paste0(out_path, ".tmp")
writeLines(toJSON(out, auto_unbox = TRUE, digits = NA, pretty = TRUE), tmp)
file.rename(tmp, out_path)
cat("written:", out_path, "\n")
