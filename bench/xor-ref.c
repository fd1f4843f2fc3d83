/* The plain loop a C programmer would write for 4-source XOR parity,
 * built by bench/run-raid.sh with gcc -O3 -march=native (which vectorises
 * it) and run on the same sizes as `microbench xor`, so the kernel's
 * figure has its reference in the same run. Prints one JSON line:
 * {"size": N, "c_source_gbps": G} (GB/s of source data, as microbench). */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <stdint.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec/1e9;}
static void xor4(uint64_t *restrict d, const uint64_t *restrict a, const uint64_t *restrict b, const uint64_t *restrict c, const uint64_t *restrict e, size_t n){
  for(size_t i=0;i<n;i++) d[i]=a[i]^b[i]^c[i]^e[i];
}
int main(int argc,char**argv){
  size_t size=atol(argv[1]); size_t n=size/8;
  uint64_t *s[4]; for(int k=0;k<4;k++){s[k]=aligned_alloc(64,size); memset(s[k],k+1,size);}
  uint64_t *d=aligned_alloc(64,size);
  size_t iters = (1UL<<34)/ (size*4); if(iters<3) iters=3;
  double t=now();
  for(size_t it=0;it<iters;it++){ xor4(d,s[0],s[1],s[2],s[3],n); __asm__ volatile(""::"r"(d):"memory"); }
  double el=now()-t;
  printf("{\"bench\":\"xor-c\",\"size\":%zu,\"c_source_gbps\":%.1f}\n", size, (double)size*4*iters/el/1e9);
  return 0;
}
