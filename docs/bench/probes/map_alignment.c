// Probe: populate a private mapping of a file (MADV_POPULATE_READ) at the address the kernel picks,
// at a 2 MB-aligned one, and 4 KB / 64 KB past it; FilePmdMapped from smaps_rollup.
// gcc -O2 map_alignment.c && ./a.out model.safetensors
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <fcntl.h>
#include <time.h>
#include <unistd.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int c,char**v){int fd=open(v[1],O_RDONLY);struct stat st;fstat(fd,&st); size_t len=st.st_size & ~4095UL;
 for(int rep=0;rep<3;rep++){
 for(int mode=0;mode<4;mode++){
  double t0=now(); char*p;
  if(mode==0){ p=mmap(0,len,PROT_READ|PROT_WRITE,MAP_PRIVATE,fd,0);}
  else { size_t shift = mode==1?0: mode==2? 4096: 65536;
    char*r=mmap(0,len+(4<<20),PROT_NONE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0);
    char*a=(char*)(((uintptr_t)r+(2<<20)-1)&~((uintptr_t)(2<<20)-1)) + shift;
    p=mmap(a,len,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_FIXED,fd,0);}
  double t1=now(); madvise(p,len,MADV_POPULATE_READ); double t2=now();
  long pmd=0; FILE*f=fopen("/proc/self/smaps_rollup","r");char b[256];while(fgets(b,256,f)) if(sscanf(b,"FilePmdMapped: %ld",&pmd)==1)break; fclose(f);
  printf("mode %d (%s) map %.4f populate %.4f  FilePmdMapped %ld kB\n",mode,(const char*[]){"kernel addr","2MB-aligned fixed","+4K","+64K"}[mode],t1-t0,t2-t1,pmd);
  munmap(p,len);
 }}
}
