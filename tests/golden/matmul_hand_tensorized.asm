program matmul
tensor A input bfloat16[256,256]
tensor B input bfloat16[256,1024]
tensor C output float32[256,1024]
buffer A_cache sbuf part=0 partitions=128 offset=0 size=512
buffer A_rows sbuf part=0 partitions=128 offset=512 size=512
buffer A_rows_T psum part=0 partitions=128 offset=12288 size=2048
buffer A_rows_T_1 psum part=0 partitions=128 offset=14336 size=2048
buffer C_acc psum part=0 partitions=128 offset=0 size=2048
buffer B_cache sbuf part=0 partitions=128 offset=1024 size=2048
buffer C_out sbuf part=0 partitions=128 offset=3072 size=2048
loop io 2:
  loop jo 2:
    dma.q0 sbuf:A_rows.bfloat16[p0@512][1,16][1,256] <- hbm:A.bfloat16[@32768*io][256,16][1,256]
    dma.q1 sbuf:A_rows.bfloat16[p16@512][1,16][1,256] <- hbm:A.bfloat16[@4096+32768*io][256,16][1,256]
    dma.q2 sbuf:A_rows.bfloat16[p32@512][1,16][1,256] <- hbm:A.bfloat16[@8192+32768*io][256,16][1,256]
    dma.q3 sbuf:A_rows.bfloat16[p48@512][1,16][1,256] <- hbm:A.bfloat16[@12288+32768*io][256,16][1,256]
    dma.q4 sbuf:A_rows.bfloat16[p64@512][1,16][1,256] <- hbm:A.bfloat16[@16384+32768*io][256,16][1,256]
    dma.q5 sbuf:A_rows.bfloat16[p80@512][1,12][1,256] <- hbm:A.bfloat16[@20480+32768*io][256,12][1,256]
    dma.q6 sbuf:A_rows.bfloat16[p92@512][1,12][1,256] <- hbm:A.bfloat16[@23552+32768*io][256,12][1,256]
    dma.q7 sbuf:A_rows.bfloat16[p104@512][1,12][1,256] <- hbm:A.bfloat16[@26624+32768*io][256,12][1,256]
    dma.q8 sbuf:A_rows.bfloat16[p116@512][1,12][1,256] <- hbm:A.bfloat16[@29696+32768*io][256,12][1,256]
    loop ko2 1:
      transpose.pe psum:A_rows_T.float32[p0@12288+512*(ko2%1)][1,128][1,128] <- sbuf:A_rows.bfloat16[p0@512+512*ko2][1,128][1,128]
      tensor_copy.act sbuf:A_cache.bfloat16[p0@512*ko2][1,128][1,128] <- psum:A_rows_T.float32[p0@12288+512*(ko2%1)][1,128][1,128]
      transpose.pe psum:A_rows_T_1.float32[p0@14336+512*(ko2%1)][1,128][1,128] <- sbuf:A_rows.bfloat16[p0@768+512*ko2][1,128][1,128]
      tensor_copy.dve sbuf:A_cache.bfloat16[p0@256+512*ko2][1,128][1,128] <- psum:A_rows_T_1.float32[p0@14336+512*(ko2%1)][1,128][1,128]
    loop ko 2:
      dma.q5 sbuf:B_cache.bfloat16[p0@1024+1024*(ko%2)][1,16][1,512] <- hbm:B.bfloat16[@512*jo+131072*ko][1024,16][1,512]
      dma.q6 sbuf:B_cache.bfloat16[p16@1024+1024*(ko%2)][1,16][1,512] <- hbm:B.bfloat16[@16384+512*jo+131072*ko][1024,16][1,512]
      dma.q7 sbuf:B_cache.bfloat16[p32@1024+1024*(ko%2)][1,16][1,512] <- hbm:B.bfloat16[@32768+512*jo+131072*ko][1024,16][1,512]
      dma.q8 sbuf:B_cache.bfloat16[p48@1024+1024*(ko%2)][1,16][1,512] <- hbm:B.bfloat16[@49152+512*jo+131072*ko][1024,16][1,512]
      dma.q0 sbuf:B_cache.bfloat16[p64@1024+1024*(ko%2)][1,16][1,512] <- hbm:B.bfloat16[@65536+512*jo+131072*ko][1024,16][1,512]
      dma.q1 sbuf:B_cache.bfloat16[p80@1024+1024*(ko%2)][1,12][1,512] <- hbm:B.bfloat16[@81920+512*jo+131072*ko][1024,12][1,512]
      dma.q2 sbuf:B_cache.bfloat16[p92@1024+1024*(ko%2)][1,12][1,512] <- hbm:B.bfloat16[@94208+512*jo+131072*ko][1024,12][1,512]
      dma.q3 sbuf:B_cache.bfloat16[p104@1024+1024*(ko%2)][1,12][1,512] <- hbm:B.bfloat16[@106496+512*jo+131072*ko][1024,12][1,512]
      dma.q4 sbuf:B_cache.bfloat16[p116@1024+1024*(ko%2)][1,12][1,512] <- hbm:B.bfloat16[@118784+512*jo+131072*ko][1024,12][1,512]
      matmul.pe psum:C_acc.float32[p0@0][1,128][1,512] <- sbuf:A_cache.bfloat16[p0@256*ko][1,128][1,128], sbuf:B_cache.bfloat16[p0@1024+1024*(ko%2)][1,128][1,512] acc=add reset_on=[ko]
    tensor_copy.act sbuf:C_out.float32[p0@3072][1,128][1,256] <- psum:C_acc.float32[p0@0][1,128][1,256]
    tensor_copy.dve sbuf:C_out.float32[p0@4096][1,128][1,256] <- psum:C_acc.float32[p0@1024][1,128][1,256]
    dma.q9 hbm:C.float32[@131072*io+512*jo][1024,20][1,512] <- sbuf:C_out.float32[p0@3072][1,20][1,512]
    dma.q10 hbm:C.float32[@20480+131072*io+512*jo][1024,20][1,512] <- sbuf:C_out.float32[p20@3072][1,20][1,512]
    dma.q11 hbm:C.float32[@40960+131072*io+512*jo][1024,20][1,512] <- sbuf:C_out.float32[p40@3072][1,20][1,512]
    dma.q12 hbm:C.float32[@61440+131072*io+512*jo][1024,20][1,512] <- sbuf:C_out.float32[p60@3072][1,20][1,512]
    dma.q13 hbm:C.float32[@81920+131072*io+512*jo][1024,16][1,512] <- sbuf:C_out.float32[p80@3072][1,16][1,512]
    dma.q14 hbm:C.float32[@98304+131072*io+512*jo][1024,16][1,512] <- sbuf:C_out.float32[p96@3072][1,16][1,512]
    dma.q15 hbm:C.float32[@114688+131072*io+512*jo][1024,16][1,512] <- sbuf:C_out.float32[p112@3072][1,16][1,512]
