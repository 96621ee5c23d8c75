/* Compiled kernels for the out-of-distribution gate's per-batch work (runtime/ood.py).

Why C: on a 64-px model run fast (OpenVINO int8, batch 16: 4-7 ms) the gate's numpy part took
0.5-0.7 ms, nearly all of it the fixed cost of some hundred small numpy calls, not arithmetic.
These functions do the same work in one call each. runtime/ood.py keeps the numpy code as
the reference and the fallback (used where this module was not built, e.g. no C compiler at
install); tests/test_ood.py checks that both give the same values.

Both take and fill buffers (the buffer protocol: no numpy headers needed to build), and let
other Python threads run while they compute (serve's network threads, predict's prefetch).
Compiled with -ffp-contract=off (setup.py), so that no a * b + c becomes one fused rounding (the
default on CPUs with FMA, e.g. ARM): the block means and the bins are then rounded exactly as
numpy rounds them.
*/
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define LAYOUT_BLOCKS 8
#define HISTOGRAM_BINS 16
#define TEXTURE_LEVELS 3
#define DESCRIPTOR_DIM (LAYOUT_BLOCKS * LAYOUT_BLOCKS + HISTOGRAM_BINS + TEXTURE_LEVELS + 1)

/* numpy's _block_mean: factor x factor block means of a [size, size] crop into [side, side],
   side = size / factor (a remainder of rows / columns is dropped). The same float32 additions in
   the same order (the block's rows one after another, then its columns), then * 1 / factor^2
   (a power of two, exact), so the same bits. row_sums: room for size floats. */
static void block_mean(const float *x, Py_ssize_t size, Py_ssize_t factor, float *out, float *row_sums) {
    Py_ssize_t side = size / factor, width = side * factor;
    float scale = (float)(1.0 / (double)(factor * factor));
    for (Py_ssize_t i = 0; i < side; i++) {
        const float *first = x + (i * factor) * size;
        for (Py_ssize_t j = 0; j < width; j++) row_sums[j] = first[j];
        for (Py_ssize_t k = 1; k < factor; k++) {
            const float *row = first + k * size;
            for (Py_ssize_t j = 0; j < width; j++) row_sums[j] += row[j];
        }
        for (Py_ssize_t j = 0; j < side; j++) {
            float block = row_sums[j * factor];
            for (Py_ssize_t k = 1; k < factor; k++) block += row_sums[j * factor + k];
            out[i * side + j] = block * scale;
        }
    }
}

/* numpy's _pool2: rows paired first, then columns, then * 0.25 (the same float32 operations in
   the same order, so the same bits). An odd last row / column is dropped. */
static void pool2(const float *x, Py_ssize_t h, Py_ssize_t w, float *out) {
    Py_ssize_t oh = h / 2, ow = w / 2;
    for (Py_ssize_t i = 0; i < oh; i++) {
        const float *r0 = x + (2 * i) * w, *r1 = r0 + w;
        float *o = out + i * ow;
        for (Py_ssize_t j = 0; j < ow; j++) {
            float left = r0[2 * j] + r1[2 * j];
            float right = r0[2 * j + 1] + r1[2 * j + 1];
            o[j] = (left + right) * 0.25f;
        }
    }
}

#define LANES 16
#define BLOCK (16 * LANES)

/* The sums below add BLOCK elements at a time in LANES independent float accumulators and carry
   the block totals in double. The lanes keep the additions independent, so the compiler
   vectorises them (one running sum is a chain of dependent additions, 4x slower here); the short
   blocks keep the error near that of numpy's pairwise float32 sums (16 additions per lane), so
   e.g. a constant crop's deviation stays at rounding level. */
static double lane_total(const float *lanes) {
    double total = 0.0;
    for (int l = 0; l < LANES; l++) total += lanes[l];
    return total;
}

/* What blocked_sum adds up for each j < count. */
enum term { VALUE, SQUARED_DEVIATION, ABSOLUTE_DIFFERENCE };

static inline float term_at(enum term kind, const float *a, const float *b, float centre, Py_ssize_t j) {
    switch (kind) {
    case VALUE: return a[j];
    case SQUARED_DEVIATION: return (a[j] - centre) * (a[j] - centre);
    default: return fabsf(a[j] - b[j]);
    }
}

/* The sum of term_at(kind, a, b, centre, j) for j < count (b: ABSOLUTE_DIFFERENCE only; centre:
   SQUARED_DEVIATION only). Called with a constant kind, so the compiler makes one vectorised
   loop per kind. */
static double blocked_sum(enum term kind, const float *a, const float *b, float centre, Py_ssize_t count) {
    double total = 0.0;
    for (Py_ssize_t start = 0; start < count; start += BLOCK) {
        Py_ssize_t n = count - start < BLOCK ? count - start : BLOCK;
        const float *pa = a + start, *pb = b != NULL ? b + start : NULL;
        float lanes[LANES] = {0};
        Py_ssize_t j = 0;
        for (; j + LANES <= n; j += LANES)
            for (int l = 0; l < LANES; l++) lanes[l] += term_at(kind, pa, pb, centre, j + l);
        for (; j < n; j++) lanes[0] += term_at(kind, pa, pb, centre, j);
        total += lane_total(lanes);
    }
    return total;
}

/* numpy's _roughness: mean absolute difference of vertical neighbours plus that of horizontal
   neighbours (each a mean over its own count). */
static double roughness(const float *y, Py_ssize_t h, Py_ssize_t w) {
    double total = 0.0;
    if (h > 1 && w > 0) total += blocked_sum(ABSOLUTE_DIFFERENCE, y + w, y, 0.0f, (h - 1) * w) / (double)((h - 1) * w);
    if (w > 1 && h > 0) {
        /* the flat image's neighbour pairs in one vectorised pass, less the h - 1 pairs that wrap
           from a row's end to the next row's start */
        double horizontal = blocked_sum(ABSOLUTE_DIFFERENCE, y + 1, y, 0.0f, h * w - 1);
        for (Py_ssize_t i = 1; i < h; i++) horizontal -= fabsf(y[i * w] - y[i * w - 1]);
        total += horizontal / (double)(h * (w - 1));
    }
    return total;
}

/* image_descriptor(images, n, size, factor, layout_rows, clip_low, clip_high, out)
   images: float32 [N, size, size] C-contiguous crops; factor: descriptor_factor(size), the block
   the crops are averaged by first (1: not at all); layout_rows: float32 [8, C], layout_matrix(C)
   for the coarse level's side C; out: float32 [N, DESCRIPTOR_DIM], filled: layout (64),
   histogram (16), texture (4). */
static PyObject *image_descriptor(PyObject *self, PyObject *args) {
    Py_buffer img, lay, out;
    double clip_low, clip_high;
    Py_ssize_t n, crop_size, factor, coarse_side;
    if (!PyArg_ParseTuple(args, "y*nnny*ddw*", &img, &n, &crop_size, &factor, &lay, &clip_low, &clip_high, &out))
        return NULL;
    PyObject *result = NULL;
    float *work = NULL;
    Py_ssize_t size = factor >= 1 ? crop_size / factor : 0; /* the side the descriptor reads */
    if (n < 1 || size < 1 || img.len != (Py_ssize_t)(n * crop_size * crop_size * sizeof(float))
        || out.len != (Py_ssize_t)(n * DESCRIPTOR_DIM * sizeof(float)) || lay.len % (LAYOUT_BLOCKS * sizeof(float))) {
        PyErr_SetString(PyExc_ValueError, "image_descriptor: buffer sizes do not match [N, S, S] and [N, 84]");
        goto done;
    }
    coarse_side = lay.len / (Py_ssize_t)(LAYOUT_BLOCKS * sizeof(float));
    /* levels: the crop (block-averaged), its 2 x 2 means and theirs (a level under 4 px is not
       pooled again); the layout reads the coarsest level at least 8 px high, else the crop */
    Py_ssize_t side[TEXTURE_LEVELS];
    side[0] = size;
    for (int l = 1; l < TEXTURE_LEVELS; l++) side[l] = side[l - 1] >= 4 ? side[l - 1] / 2 : side[l - 1];
    int coarse = 0;
    for (int l = TEXTURE_LEVELS - 1; l >= 0; l--)
        if (side[l] >= LAYOUT_BLOCKS) { coarse = l; break; }
    if (side[coarse] != coarse_side) {
        PyErr_SetString(PyExc_ValueError, "image_descriptor: layout matrix does not match the coarse level");
        goto done;
    }
    /* work: the block-averaged crop (factor > 1), the two pooled levels, the block rows' sums
       (crop_size), the layout's column sums (size) and the histogram's bins (side[1]^2 int32) */
    Py_ssize_t levels_end = size * size + size * size / 4 + size * size / 16 + 2;
    Py_ssize_t half_count = side[1] * side[1];
    work = (float *)malloc(sizeof(float) * (size_t)(levels_end + crop_size + size) + sizeof(int32_t) * (size_t)half_count);
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    float *row_sums = work + levels_end, *columns = work + levels_end + crop_size;
    int32_t *bins = (int32_t *)(columns + size);
    const float *rows = (const float *)lay.buf;
    /* each layout row's nonzero weights lie in one run [first, last) of the coarse level's pixels
       (a block); the products skip the zeros around it, which add nothing (8x fewer at 64 px) */
    Py_ssize_t first[LAYOUT_BLOCKS], last[LAYOUT_BLOCKS];
    for (int a = 0; a < LAYOUT_BLOCKS; a++) {
        const float *ra = rows + a * coarse_side;
        first[a] = 0;
        while (first[a] < coarse_side && ra[first[a]] == 0.0f) first[a]++;
        last[a] = coarse_side;
        while (last[a] > first[a] && ra[last[a] - 1] == 0.0f) last[a]--;
    }
    float span_f = (float)(HISTOGRAM_BINS / (clip_high - clip_low > 1e-6 ? clip_high - clip_low : 1e-6));
    float low_f = (float)clip_low;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t k = 0; k < n; k++) {
        const float *x = (const float *)img.buf + k * crop_size * crop_size;
        float *o = (float *)out.buf + k * DESCRIPTOR_DIM;
        float *next = work;
        if (factor > 1) {
            if (factor == 2)  /* the same operations in the same order; its loop is simpler */
                pool2(x, crop_size, crop_size, next);
            else
                block_mean(x, crop_size, factor, next, row_sums);
            x = next;
            next += size * size;
        }
        const float *level[TEXTURE_LEVELS];
        level[0] = x;
        for (int l = 1; l < TEXTURE_LEVELS; l++) {
            if (side[l] != side[l - 1]) {
                pool2(level[l - 1], side[l - 1], side[l - 1], next);
                level[l] = next;
                next += side[l] * side[l];
            } else {
                level[l] = level[l - 1];
            }
        }
        /* spread: population standard deviation of the crop (two passes, as numpy's x.std) */
        Py_ssize_t count = size * size;
        float mean = (float)(blocked_sum(VALUE, x, NULL, 0.0f, count) / (double)count);
        double squares = blocked_sum(SQUARED_DEVIATION, x, NULL, mean, count);
        float spread = (float)sqrt(squares / (double)count);
        if (spread < 1e-6f) spread = 1e-6f;
        float *texture = o + LAYOUT_BLOCKS * LAYOUT_BLOCKS + HISTOGRAM_BINS;
        for (int l = 0; l < TEXTURE_LEVELS; l++)
            texture[l] = (float)roughness(level[l], side[l], side[l]) / spread;
        texture[TEXTURE_LEVELS] = spread;
        /* histogram of the half-resolution level over the clip range (bins as numpy computes them) */
        float *hist = o + LAYOUT_BLOCKS * LAYOUT_BLOCKS;
        /* four interleaved count arrays: consecutive pixels often share a bin, and one array
           would make each increment wait for the previous one */
        Py_ssize_t counts[4][HISTOGRAM_BINS] = {{0}};
        /* the bins first, in a loop without branches that the compiler vectorises: clamping to
           [0, 15] before truncating gives numpy's clip(trunc(v), 0, 15) for every finite v */
        const float top_bin = (float)(HISTOGRAM_BINS - 1);
        for (Py_ssize_t i = 0; i < half_count; i++) {
            float v = (level[1][i] - low_f) * span_f;
            v = v > 0.0f ? v : 0.0f;
            v = v < top_bin ? v : top_bin;
            bins[i] = (int32_t)v;
        }
        for (Py_ssize_t i = 0; i < half_count; i++) counts[i & 3][bins[i]]++;
        for (int b = 0; b < HISTOGRAM_BINS; b++) counts[0][b] += counts[1][b] + counts[2][b] + counts[3][b];
        for (int b = 0; b < HISTOGRAM_BINS; b++) hist[b] = (float)((double)counts[0][b] / (double)half_count);
        /* layout: 8 x 8 block means of the coarse level (rows @ level @ rows.T) */
        const float *c = level[coarse];
        Py_ssize_t cs = side[coarse];
        for (int a = 0; a < LAYOUT_BLOCKS; a++) {
            /* column sums of block row a (weights rows[a]), then block means along the row */
            for (Py_ssize_t j = 0; j < cs; j++) columns[j] = 0.0f;
            const float *ra = rows + a * cs;
            for (Py_ssize_t i = first[a]; i < last[a]; i++) {
                if (ra[i] == 0.0f) continue;
                const float *ci = c + i * cs;
                for (Py_ssize_t j = 0; j < cs; j++) columns[j] += ra[i] * ci[j];
            }
            for (int b = 0; b < LAYOUT_BLOCKS; b++) {
                const float *rb = rows + b * cs;
                double acc = 0.0;
                for (Py_ssize_t j = first[b]; j < last[b]; j++) acc += (double)columns[j] * rb[j];
                o[a * LAYOUT_BLOCKS + b] = (float)acc;
            }
        }
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(work);
    PyBuffer_Release(&img);
    PyBuffer_Release(&lay);
    PyBuffer_Release(&out);
    return result;
}

/* The k-th largest (ties counted), for i < width, of row[i] or, given bank_sq, of the image
   part's closeness 2 row[i] - bank_sq[i] in float32 (2 row[i] is exact, so this is numpy's
   in-place *= 2 and -= bank_sq, bit for bit). The k largest so far are kept sorted in
   top[0..k-1]. The values are made KTH_CHUNK at a time in a loop the compiler vectorises, which
   also tells whether any of them beats the k-th largest so far; after the first chunks few do,
   and the others are never looked at one by one (a row of 782: 0.7 -> 0.3 us). */
#define KTH_CHUNK 32
static float row_kth(const float *row, const float *bank_sq, Py_ssize_t width, Py_ssize_t k, float *top) {
    for (Py_ssize_t i = 0; i < k; i++) top[i] = -INFINITY;
    float least = -INFINITY; /* top[k - 1]: the k-th largest so far */
    float chunk[KTH_CHUNK];
    for (Py_ssize_t start = 0; start < width; start += KTH_CHUNK) {
        Py_ssize_t m = width - start < KTH_CHUNK ? width - start : KTH_CHUNK;
        int any = 0;
        if (bank_sq != NULL)
            for (Py_ssize_t j = 0; j < m; j++) {
                chunk[j] = row[start + j] * 2.0f - bank_sq[start + j];
                any |= chunk[j] > least;
            }
        else
            for (Py_ssize_t j = 0; j < m; j++) {
                chunk[j] = row[start + j];
                any |= chunk[j] > least;
            }
        if (!any) continue;
        for (Py_ssize_t j = 0; j < m; j++) {
            float v = chunk[j];
            if (!(v > least)) continue;
            Py_ssize_t i = k - 1;
            while (i > 0 && top[i - 1] < v) {
                top[i] = top[i - 1];
                i--;
            }
            top[i] = v;
            least = top[k - 1];
        }
    }
    return top[k - 1];
}

/* kth_largest(values, n, width, k, out): each row's k-th largest value (ties counted) of the
   float32 [n, width] buffer into float32 out [n]; the same value as np.partition's, bit for bit
   (a selection, no arithmetic). values is left as it is. */
static PyObject *kth_largest(PyObject *self, PyObject *args) {
    Py_buffer values, out;
    Py_ssize_t n, width, k;
    if (!PyArg_ParseTuple(args, "y*nnnw*", &values, &n, &width, &k, &out)) return NULL;
    PyObject *result = NULL;
    float *top = NULL;
    if (n < 1 || width < 1 || k < 1 || k > width || values.len != (Py_ssize_t)(n * width * sizeof(float))
        || out.len != (Py_ssize_t)(n * sizeof(float))) {
        PyErr_SetString(PyExc_ValueError, "kth_largest: need 1 <= k <= width and buffers of [n, width] and [n]");
        goto done;
    }
    top = (float *)malloc(sizeof(float) * (size_t)k);
    if (top == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < n; r++)
        ((float *)out.buf)[r] = row_kth((const float *)values.buf + r * width, NULL, width, k, top);
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(top);
    PyBuffer_Release(&values);
    PyBuffer_Release(&out);
    return result;
}

/* knn_distance(products, n, width, k, bank_sq, query_sq, out): each query's distance to its k-th
   nearest bank row, from the float32 [n, width] products of the queries with the bank, into
   float64 out [n]; runtime/ood.py's numpy code, bit for bit:
   - bank_sq None (a sphere part: unit rows): sqrt(clip(2 - 2 s, 0, 4)), s the k-th largest product;
   - bank_sq float32 [width] (the image part): sqrt(max(query_sq - c, 0)), c the k-th largest
     closeness 2 p - bank_sq (float32, as numpy's in-place ops make it), query_sq float32 [n].
   One call for what took five to seven small numpy calls per part. */
static PyObject *knn_distance(PyObject *self, PyObject *args) {
    Py_buffer products, bank_sq, query_sq, out;
    Py_ssize_t n, width, k;
    if (!PyArg_ParseTuple(args, "y*nnnz*z*w*", &products, &n, &width, &k, &bank_sq, &query_sq, &out)) return NULL;
    PyObject *result = NULL;
    float *work = NULL;
    int image = bank_sq.buf != NULL;
    if (n < 1 || width < 1 || k < 1 || k > width || products.len != (Py_ssize_t)(n * width * sizeof(float))
        || out.len != (Py_ssize_t)(n * sizeof(double)) || (query_sq.buf != NULL) != image
        || (image && (bank_sq.len != (Py_ssize_t)(width * sizeof(float)) || query_sq.len != (Py_ssize_t)(n * sizeof(float))))) {
        PyErr_SetString(PyExc_ValueError, "knn_distance: need 1 <= k <= width, buffers of [n, width], [n] (float64) "
                                          "and bank_sq [width] with query_sq [n] both given or both None");
        goto done;
    }
    work = (float *)malloc(sizeof(float) * (size_t)k); /* the top k */
    if (work == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < n; r++) {
        const float *row = (const float *)products.buf + r * width;
        double *o = (double *)out.buf + r;
        if (image) {
            double c = (double)row_kth(row, (const float *)bank_sq.buf, width, k, work);
            double d = (double)((const float *)query_sq.buf)[r] - c;
            *o = sqrt(d > 0.0 ? d : 0.0);
        } else {
            double d = 2.0 - 2.0 * (double)row_kth(row, NULL, width, k, work);
            *o = sqrt(d < 0.0 ? 0.0 : (d > 4.0 ? 4.0 : d));
        }
    }
    Py_END_ALLOW_THREADS
    Py_INCREF(Py_None);
    result = Py_None;
done:
    free(work);
    PyBuffer_Release(&products);
    PyBuffer_Release(&bank_sq);
    PyBuffer_Release(&query_sq);
    PyBuffer_Release(&out);
    return result;
}

static PyMethodDef methods[] = {
    {"image_descriptor", image_descriptor, METH_VARARGS,
     "image_descriptor(images, n, size, factor, layout_rows, clip_low, clip_high, out): fill out [N, 84]"},
    {"kth_largest", kth_largest, METH_VARARGS, "kth_largest(values, n, width, k, out): fill out [n]"},
    {"knn_distance", knn_distance, METH_VARARGS,
     "knn_distance(products, n, width, k, bank_sq, query_sq, out): fill out [n] (float64)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_gate_kernels",
                                    "Compiled kernels of the out-of-distribution gate (runtime/ood.py).", -1, methods};

PyMODINIT_FUNC PyInit__gate_kernels(void) { return PyModule_Create(&module); }
