/* A ring and an allreduce across every rank, each checked: what examples/mpi.yaml runs.
 *
 *   ring            rank 0 sends a token around the ring; each rank adds its rank to it
 *   ring fail K     rank K exits with status 3 before the ring (a rank that fails)
 *
 * Each rank prints its rank, the size and its host; rank 0 then prints the results and
 * exits 1 when either is wrong. Built into the image by scripts/mpi_image.py with the mpicc
 * of Open MPI (ring) and of MPICH (ring.mpich). */
#include <mpi.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

int main(int argc, char **argv) {
    int rank, size, token, sum, expected;
    char host[256];
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    gethostname(host, sizeof host);
    printf("rank %d of %d on %s\n", rank, size, host);
    fflush(stdout);
    if (argc > 2 && strcmp(argv[1], "fail") == 0 && atoi(argv[2]) == rank) {
        fprintf(stderr, "rank %d fails on purpose\n", rank);
        exit(3);
    }
    expected = size * (size - 1) / 2;
    if (size == 1) {
        token = 0;
    } else if (rank == 0) {
        token = 0;
        MPI_Send(&token, 1, MPI_INT, 1, 0, MPI_COMM_WORLD);
        MPI_Recv(&token, 1, MPI_INT, size - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
    } else {
        MPI_Recv(&token, 1, MPI_INT, rank - 1, 0, MPI_COMM_WORLD, MPI_STATUS_IGNORE);
        token += rank;
        MPI_Send(&token, 1, MPI_INT, (rank + 1) % size, 0, MPI_COMM_WORLD);
    }
    MPI_Allreduce(&rank, &sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) {
        int ok = token == expected && sum == expected;
        printf("ring %s: %d ranks, token %d, allreduce %d, expected %d\n", ok ? "ok" : "WRONG",
               size, token, sum, expected);
        fflush(stdout);
        MPI_Finalize();
        return ok ? 0 : 1;
    }
    MPI_Finalize();
    return 0;
}
