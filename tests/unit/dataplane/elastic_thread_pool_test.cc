// Tests of dataplane/elastic_thread_pool: httplib's TaskQueue that grows on demand up to a cap
// and shrinks when idle.
#include "dataplane/elastic_thread_pool.h"

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "absl/time/time.h"
#include "gtest/gtest.h"

namespace sflb {
namespace {

// Polls `condition` until it holds or `timeout` passes. Returns whether it held.
bool WaitUntil(const std::function<bool()>& condition, absl::Duration timeout = absl::Seconds(5)) {
  const absl::Time deadline = absl::Now() + timeout;
  while (!condition()) {
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
  return true;
}

// A gate tasks block on until the test opens it. Waits are bounded so a broken pool fails the
// test instead of hanging it.
class Gate {
 public:
  void Open() {
    std::lock_guard<std::mutex> lock(mu_);
    open_ = true;
    cv_.notify_all();
  }
  bool Wait() {
    std::unique_lock<std::mutex> lock(mu_);
    return cv_.wait_for(lock, std::chrono::seconds(10), [this] { return open_; });
  }

 private:
  std::mutex mu_;
  std::condition_variable cv_;
  bool open_ = false;
};

// Counts tasks running at once and the most seen.
class Concurrency {
 public:
  void Enter() {
    int now = ++running_;
    int seen = max_.load();
    while (now > seen && !max_.compare_exchange_weak(seen, now)) {
    }
  }
  void Leave() {
    --running_;
    ++finished_;
  }
  int running() const { return running_.load(); }
  int max() const { return max_.load(); }
  int finished() const { return finished_.load(); }

 private:
  std::atomic<int> running_{0};
  std::atomic<int> max_{0};
  std::atomic<int> finished_{0};
};

std::function<void()> BlockingTask(Gate* gate, Concurrency* c) {
  return [gate, c] {
    c->Enter();
    EXPECT_TRUE(gate->Wait()) << "gate never opened";
    c->Leave();
  };
}

TEST(ElasticThreadPoolTest, StartsWithNoThreads) {
  ElasticThreadPool pool(8, 2, absl::Seconds(10));
  ElasticThreadPool::Stats s = pool.stats();
  EXPECT_EQ(s.threads, 0u);
  EXPECT_EQ(s.busy, 0u);
  EXPECT_EQ(s.queued, 0u);
}

TEST(ElasticThreadPoolTest, RunsEveryTask) {
  std::atomic<int> done{0};
  ElasticThreadPool pool(4, 1, absl::Seconds(10));
  for (int i = 0; i < 500; ++i) pool.enqueue([&done] { ++done; });
  EXPECT_TRUE(WaitUntil([&] { return done.load() == 500; })) << done.load();
  pool.shutdown();
  EXPECT_EQ(done.load(), 500);
}

TEST(ElasticThreadPoolTest, GrowsBeyondMinIdleWhenTasksBlock) {
  // Declared before the pool, so they outlive its threads even when a test fails early.
  Gate gate;
  Concurrency c;
  ElasticThreadPool pool(32, 1, absl::Seconds(10));
  for (int i = 0; i < 6; ++i) pool.enqueue(BlockingTask(&gate, &c));
  // All six run at once: one thread each.
  EXPECT_TRUE(WaitUntil([&] { return c.running() == 6; })) << c.running();
  ElasticThreadPool::Stats s = pool.stats();
  EXPECT_EQ(s.threads, 6u);
  EXPECT_EQ(s.busy, 6u);
  EXPECT_EQ(s.queued, 0u);
  gate.Open();
  EXPECT_TRUE(WaitUntil([&] { return c.finished() == 6; }));
  EXPECT_TRUE(WaitUntil([&] { return pool.stats().busy == 0; }));
  pool.shutdown();
}

TEST(ElasticThreadPoolTest, NeverExceedsMaxThreadsAndQueuedTasksStillRun) {
  // Declared before the pool, so they outlive its threads even when a test fails early.
  Gate gate;
  Concurrency c;
  ElasticThreadPool pool(3, 0, absl::Seconds(10));
  for (int i = 0; i < 8; ++i) pool.enqueue(BlockingTask(&gate, &c));
  EXPECT_TRUE(WaitUntil([&] { return c.running() == 3 && pool.stats().queued == 5; }))
      << "running " << c.running() << ", queued " << pool.stats().queued;
  ElasticThreadPool::Stats s = pool.stats();
  EXPECT_EQ(s.threads, 3u);
  EXPECT_EQ(s.busy, 3u);
  EXPECT_EQ(s.queued, 5u);
  EXPECT_EQ(c.running(), 3);
  gate.Open();
  EXPECT_TRUE(WaitUntil([&] { return c.finished() == 8; })) << c.finished();
  EXPECT_LE(c.max(), 3);
  EXPECT_LE(pool.stats().threads, 3u);
  EXPECT_EQ(pool.stats().queued, 0u);
  pool.shutdown();
}

TEST(ElasticThreadPoolTest, ZeroMaxThreadsStillRunsTasks) {
  std::atomic<int> done{0};
  ElasticThreadPool pool(0, 0, absl::Seconds(10));  // clamped to one thread
  for (int i = 0; i < 10; ++i) pool.enqueue([&done] { ++done; });
  EXPECT_TRUE(WaitUntil([&] { return done.load() == 10; }));
  EXPECT_LE(pool.stats().threads, 1u);
  pool.shutdown();
}

TEST(ElasticThreadPoolTest, ReusesAnIdleThreadInsteadOfGrowing) {
  std::atomic<int> done{0};
  ElasticThreadPool pool(8, 1, absl::Seconds(10));
  for (int i = 1; i <= 20; ++i) {
    pool.enqueue([&done] { ++done; });
    ASSERT_TRUE(WaitUntil([&] { return done.load() == i && pool.stats().busy == 0; }));
  }
  EXPECT_EQ(pool.stats().threads, 1u) << "one task at a time needs one thread";
  pool.shutdown();
}

TEST(ElasticThreadPoolTest, IdleThreadsExitAfterTtl) {
  // Declared before the pool, so they outlive its threads even when a test fails early.
  Gate gate;
  Concurrency c;
  std::atomic<int> done{0};
  ElasticThreadPool pool(8, 0, absl::Milliseconds(50));
  for (int i = 0; i < 4; ++i) pool.enqueue(BlockingTask(&gate, &c));
  ASSERT_TRUE(WaitUntil([&] { return c.running() == 4; }));
  EXPECT_EQ(pool.stats().threads, 4u);
  gate.Open();
  EXPECT_TRUE(WaitUntil([&] { return pool.stats().threads == 0; }))
      << "threads left: " << pool.stats().threads;
  // The pool still works after shrinking to nothing.
  pool.enqueue([&done] { ++done; });
  EXPECT_TRUE(WaitUntil([&] { return done.load() == 1; }));
  pool.shutdown();
}

TEST(ElasticThreadPoolTest, KeepsMinIdleThreads) {
  const absl::Duration ttl = absl::Milliseconds(30);
  // Declared before the pool, so they outlive its threads even when a test fails early.
  Gate gate;
  Concurrency c;
  ElasticThreadPool pool(8, 2, ttl);
  for (int i = 0; i < 5; ++i) pool.enqueue(BlockingTask(&gate, &c));
  ASSERT_TRUE(WaitUntil([&] { return c.running() == 5; }));
  gate.Open();
  EXPECT_TRUE(WaitUntil([&] { return pool.stats().threads == 2; }))
      << "threads: " << pool.stats().threads;
  // Checking that something does NOT happen needs some time to pass: several TTLs, after
  // which no further thread may have left.
  absl::SleepFor(ttl * 8);
  EXPECT_EQ(pool.stats().threads, 2u);
  EXPECT_EQ(pool.stats().busy, 0u);
  pool.shutdown();
}

TEST(ElasticThreadPoolTest, ShutdownRunsQueuedTasksAndJoins) {
  // Declared before the pool, so they outlive its threads even when a test fails early.
  Gate gate;
  Concurrency c;
  std::atomic<int> done{0};
  ElasticThreadPool pool(1, 0, absl::Seconds(10));
  pool.enqueue(BlockingTask(&gate, &c));
  for (int i = 0; i < 5; ++i) pool.enqueue([&done] { ++done; });
  ASSERT_TRUE(WaitUntil([&] { return c.running() == 1 && pool.stats().queued == 5; }));
  // Open the gate while shutdown() is (most likely) already waiting. Either way the queued
  // tasks must all have run by the time shutdown() returns.
  std::thread opener([&gate] {
    absl::SleepFor(absl::Milliseconds(50));
    gate.Open();
  });
  pool.shutdown();
  EXPECT_EQ(c.finished(), 1);
  EXPECT_EQ(done.load(), 5);
  ElasticThreadPool::Stats s = pool.stats();
  EXPECT_EQ(s.threads, 0u);
  EXPECT_EQ(s.queued, 0u);
  opener.join();
  pool.shutdown();  // a second call returns at once
}

TEST(ElasticThreadPoolTest, DestructorRunsQueuedTasks) {
  std::atomic<int> done{0};
  {
    ElasticThreadPool pool(2, 0, absl::Seconds(10));
    for (int i = 0; i < 50; ++i) {
      pool.enqueue([&done] {
        absl::SleepFor(absl::Microseconds(100));
        ++done;
      });
    }
  }
  EXPECT_EQ(done.load(), 50);
}

TEST(ElasticThreadPoolTest, ManyProducersWithThreadsComingAndGoing) {
  // A tiny TTL makes workers exit and get reaped while tasks keep arriving.
  std::atomic<int> done{0};
  ElasticThreadPool pool(4, 0, absl::Milliseconds(1));
  std::atomic<int> max_threads_seen{0};
  constexpr int kProducers = 4;
  constexpr int kTasks = 300;
  std::vector<std::thread> producers;
  for (int p = 0; p < kProducers; ++p) {
    producers.emplace_back([&] {
      for (int i = 0; i < kTasks; ++i) {
        pool.enqueue([&] {
          int threads = static_cast<int>(pool.stats().threads);
          int seen = max_threads_seen.load();
          while (threads > seen && !max_threads_seen.compare_exchange_weak(seen, threads)) {
          }
          ++done;
        });
        if (i % 50 == 0) absl::SleepFor(absl::Milliseconds(2));  // let workers time out
      }
    });
  }
  for (std::thread& t : producers) t.join();
  EXPECT_TRUE(WaitUntil([&] { return done.load() == kProducers * kTasks; })) << done.load();
  EXPECT_LE(max_threads_seen.load(), 4);
  pool.shutdown();
  EXPECT_EQ(pool.stats().threads, 0u);
}

}  // namespace
}  // namespace sflb
